"""Partial FC's step against a dense one with as many rows: the whole trainer at C classes and rate r, and at C*r
classes and rate 1.0 (the same sampled rows per rank), alternating in one run.

Each side is `tools/profile_step.py` on `world` gloo ranks started as processes (torch's env:// variables), so the
times are the trainer's own step, phase by phase. Beside the wall time of the slower rank, each side's CPU time per
step (the larger of its ranks', every thread): other processes on a busy machine slow the wall time of either side
by chance, not the CPU time, which tells whether a round's ratio is the step's or the machine's. With sampling the
step should cost what it samples: issue 25 asks A / B <= 1.25 at 1M classes and at the largest count run.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from largefr.perf.scale_run import ROOT, rank_environments, run_processes

SIDES = ("A", "B")


@dataclass(kw_only=True)
class SampledStepPlan:
    config: str
    classes: list[int]
    sample_rate: float = 0.1
    world: int = 2
    batch: int = 32
    """Images per rank per step."""
    steps: int = 6
    warmup: int = 2
    rounds: int = 2
    overrides: list[str] = field(default_factory=list)

    def side(self, name: str, classes: int) -> tuple[int, float]:
        """(classes, sample rate) of side A (sampled) or B (dense, as many rows)."""
        return (classes, self.sample_rate) if name == "A" else (round(classes * self.sample_rate), 1.0)


COMMON = ["data.loader=synthetic", "data.synthetic=null", "data.val_targets=[]", "logging.every=1000"]
"""In-memory batches, no verification, no logging work: the step alone."""


def profile_side(plan: SampledStepPlan, classes: int, rate: float, work: Path) -> dict:
    """One `profile_step.py` run; its JSON report (step seconds and phases of every rank)."""
    report = work / "report.json"
    command = [sys.executable, str(ROOT / "tools" / "profile_step.py"), "--config", plan.config,
               "--steps", str(plan.steps), "--warmup", str(plan.warmup), "--json", str(report),
               "--set", *COMMON, f"train.batch_size={plan.batch}", f"data.num_classes={classes}",
               f"data.num_images={classes}", f"head.sample_rate={rate}", f"output={work / 'run'}", *plan.overrides]
    work.mkdir(parents=True, exist_ok=True)
    logs = [work / f"rank{rank}.out" for rank in range(plan.world)]
    results = run_processes([command] * plan.world, rank_environments(plan.world), logs)
    if any(r.returncode != 0 for r in results) or not report.exists():
        tail = logs[0].read_text()[-2000:]
        raise RuntimeError(f"profile_step.py failed at {classes} classes, rate {rate} (logs in {work}):\n{tail}")
    return json.loads(report.read_text())


def slowest_rank(report: dict) -> dict:
    return max(report["ranks"], key=lambda r: r["step_seconds"])


def bench_sampled_step(plan: SampledStepPlan, work: Path, progress=print) -> dict:
    """Alternating rounds of A and B at every class count; per round the slower rank's step seconds."""
    rows = []
    for classes in plan.classes:
        for round_index in range(1, plan.rounds + 1):
            sides = {}
            for name in SIDES:
                side_classes, rate = plan.side(name, classes)
                report = profile_side(plan, side_classes, rate, work / f"{classes}-{round_index}-{name}")
                rank = slowest_rank(report)
                cpu = max(r["cpu_seconds"] for r in report["ranks"])
                sides[name] = {"classes": side_classes, "rate": rate, "step_seconds": rank["step_seconds"],
                               "cpu_seconds": cpu, "phases_seconds": rank["phases_seconds"],
                               "peak_gib": rank["peak_memory_bytes"] / 2**30}
                progress(f"[{classes:,} classes, round {round_index}] {name}: {side_classes:,} classes at rate {rate}: "
                         f"{rank['step_seconds']:.3f} s per step (CPU {cpu:.3f} s)")
            rows.append({"classes": classes, "round": round_index, **sides,
                         "ratio": sides["A"]["step_seconds"] / sides["B"]["step_seconds"],
                         "cpu_ratio": sides["A"]["cpu_seconds"] / sides["B"]["cpu_seconds"]})
    medians = {c: statistics.median(r["ratio"] for r in rows if r["classes"] == c) for c in plan.classes}
    cpu_medians = {c: statistics.median(r["cpu_ratio"] for r in rows if r["classes"] == c) for c in plan.classes}
    return {"plan": {k: v for k, v in vars(plan).items()}, "rows": rows, "median_ratio": medians,
            "median_cpu_ratio": cpu_medians}


def format_report(result: dict) -> str:
    lines = ["| classes | round | A: rate r, s/step | B: C*r classes, rate 1.0, s/step | A / B | CPU s/step A, B | "
             "CPU A / B |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['classes']:,} | {row['round']} | {row['A']['step_seconds']:.3f} | "
                     f"{row['B']['step_seconds']:.3f} | {row['ratio']:.2f} | {row['A']['cpu_seconds']:.3f}, "
                     f"{row['B']['cpu_seconds']:.3f} | {row['cpu_ratio']:.2f} |")
    lines.append("")
    lines += [f"median A / B at {c:,} classes: {m:.2f} (CPU time: {result['median_cpu_ratio'][c]:.2f})"
              for c, m in result["median_ratio"].items()]
    last = result["rows"][-1]
    lines += ["", f"phases of the last round ({last['classes']:,} classes), seconds per step:", "| phase | A | B |",
              "|---|---:|---:|"]
    for phase, a in last["A"]["phases_seconds"].items():
        b = last["B"]["phases_seconds"].get(phase, 0.0)
        if max(a, b) >= 0.005:
            lines.append(f"| {phase} | {a:.3f} | {b:.3f} |")
    return "\n".join(lines)
