"""The whole trainer at a class count: train, checkpoint, resume on other world sizes, reshard, export.

Each phase is a real job on this machine: the ranks are `launch/train.py` processes (torch's env
launcher, gloo on CPU), the tools are `tools/reshard_checkpoint.py` and `tools/export_backbone.py`.
Each process's peak resident memory comes from the kernel when it ends (`os.wait4`'s ru_maxrss: its
high-water mark, file pages it mapped included), so nothing is sampled and no peak is missed.

Phases of one class count C (world W, N steps):
* train: 2N steps on W ranks, a checkpoint at step N (the uninterrupted run);
* resume W->W: from step N to 2N; its losses must equal the uninterrupted run's, step for step;
* resume W->M for each other M: from step N, one step (the restore and a step on M ranks);
* reshard: the checkpoint re-split for the largest M by the offline tool (one process);
* export: the backbone weights of the checkpoint (one process).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from largefr.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
LOSS_LINE = re.compile(r"step (\d+)/\d+ \|[^|]*\| loss (\S+)")
SCALE_OVERRIDES = ("data.loader=synthetic", "data.synthetic=null", "data.val_targets=[]", "eval.every=0",
                   "logging.every=1", "schedule.epochs=1000")
"""In-memory synthetic images (the data never limits the step), no verification, every step logged."""


@dataclass(kw_only=True)
class ProcessResult:
    """One finished process: its exit status, peak resident memory and wall time."""

    returncode: int
    peak_rss_bytes: int
    seconds: float


@dataclass(kw_only=True)
class PhaseResult:
    phase: str
    world: int
    seconds: float
    peak_rss_bytes: list[int]
    """Per rank (one entry for a one-process tool)."""
    ok: bool
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"phase": self.phase, "world": self.world, "seconds": round(self.seconds, 2), "ok": self.ok,
                "peak_rss_gib": [round(b / 2**30, 3) for b in self.peak_rss_bytes], **self.detail}


def run_processes(commands: list[list[str]], envs: list[dict[str, str]], log_paths: list[Path]) -> list[ProcessResult]:
    """Start every command at once, wait for all; each one's exit status and peak RSS (ru_maxrss, KiB on Linux)."""
    started = time.monotonic()
    procs = []
    for command, env, log_path in zip(commands, envs, log_paths):
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    results: dict[int, ProcessResult] = {}
    while len(results) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        index = next((i for i, p in enumerate(procs) if p.pid == pid), None)
        if index is None:
            continue  # a child of this process that is not one of these
        procs[index].returncode = os.waitstatus_to_exitcode(status)
        results[index] = ProcessResult(returncode=procs[index].returncode, peak_rss_bytes=usage.ru_maxrss * 1024,
                                       seconds=time.monotonic() - started)
    return [results[i] for i in range(len(procs))]


def train_ranks(config: str, overrides: list[str], world: int, log_dir: Path, *,
                resume: str | None = None) -> list[ProcessResult]:
    """`launch/train.py` on `world` ranks of one gloo group (torch's env:// launcher variables)."""
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", config, "--set", *overrides]
    if resume is not None:
        command += ["--resume", resume]
    log_dir.mkdir(parents=True, exist_ok=True)
    return run_processes([command] * world, rank_environments(world),
                         [log_dir / f"rank{rank}.out" for rank in range(world)])


def rank_environments(world: int) -> list[dict[str, str]]:
    """The environment of each of `world` ranks of one gloo group on this machine (torch's env:// variables, a
    free rendezvous port, one thread each, this checkout first on the path)."""
    port = str(free_port())
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return [dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world),
                 LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for rank in range(world)]


def logged_losses(output: Path) -> dict[int, str]:
    """Step -> the loss printed on its progress line (train.log of a run logging every step)."""
    text = (output / "train.log").read_text() if (output / "train.log").exists() else ""
    return {int(step): loss for step, loss in LOSS_LINE.findall(text)}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _phase(name: str, world: int, results: list[ProcessResult], **detail) -> PhaseResult:
    return PhaseResult(phase=name, world=world, seconds=max(r.seconds for r in results),
                       peak_rss_bytes=[r.peak_rss_bytes for r in results],
                       ok=all(r.returncode == 0 for r in results), detail=detail)


def run_scale_point(*, config: str, classes: int, world: int, resume_worlds: list[int], steps: int, batch: int,
                    extra: list[str], work: Path, progress=print) -> list[PhaseResult]:
    """Every phase at one class count (per-rank batch `batch`); `work` holds the runs (the caller removes it)."""
    base = [*SCALE_OVERRIDES, f"data.num_classes={classes}", f"data.num_images={classes}", *extra]
    phases = []
    train_out = work / "train"
    progress(f"[{classes:,} classes] train {2 * steps} steps on {world} ranks, checkpoint at step {steps}")
    results = train_ranks(config, [*base, f"output={train_out}", f"train.max_steps={2 * steps}",
                                   f"checkpoint.every={steps}", "checkpoint.keep_last=2"], world, train_out / "ranks")
    summary = _read_json(train_out / "summary.json")
    checkpoint = train_out / "checkpoints" / f"step_{steps}"
    phases.append(_phase("train", world, results, images_per_sec=summary.get("images_per_sec"),
                         steps_per_sec=_steps_per_sec(summary, world, batch),
                         checkpoint_gib=round(folder_bytes(checkpoint) / 2**30, 3) if checkpoint.exists() else None))
    progress(f"  {_describe(phases[-1])}")
    if not checkpoint.exists():
        return phases
    for later in (train_out / "checkpoints").glob("step_*"):  # disk: only the checkpoint the phases read stays
        if later != checkpoint:
            shutil.rmtree(later, ignore_errors=True)
    reference = logged_losses(train_out)
    for target in resume_worlds:
        out = work / f"resume_{world}_{target}"
        last = 2 * steps if target == world else steps + 1
        progress(f"[{classes:,} classes] resume {world}->{target} from step {steps} to {last}")
        results = train_ranks(config, [*base, f"output={out}", f"train.max_steps={last}", "checkpoint.every=0"],
                              target, out / "ranks", resume=str(checkpoint))
        detail = {}
        if target == world:
            resumed = logged_losses(out)
            compared = [s for s in range(steps + 1, last + 1) if s in reference]
            detail["losses_equal"] = bool(compared) and all(resumed.get(s) == reference[s] for s in compared)
            detail["final_loss_equal"] = _read_json(out / "summary.json").get("final_loss") == summary.get("final_loss")
        phases.append(_phase(f"resume {world}->{target}", target, results, **detail))
        progress(f"  {_describe(phases[-1])}")
        shutil.rmtree(out, ignore_errors=True)  # its end-of-run checkpoint is as large as the one it read
    phases += _tool_phases(checkpoint, max(resume_worlds + [world]), work, progress, classes)
    return phases


def _tool_phases(checkpoint: Path, reshard_world: int, work: Path, progress, classes: int) -> list[PhaseResult]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    phases = []
    for name, command in (
            (f"reshard ->{reshard_world}", ["tools/reshard_checkpoint.py", "--checkpoint", str(checkpoint),
                                            "--world", str(reshard_world), "--out", str(work / "resharded")]),
            ("export", ["tools/export_backbone.py", "--checkpoint", str(checkpoint), "--out",
                        str(work / "backbone.pt")])):
        progress(f"[{classes:,} classes] {name}")
        results = run_processes([[sys.executable, *command]], [env], [work / f"{name.split()[0]}.out"])
        phases.append(_phase(name, 1, results))
        progress(f"  {_describe(phases[-1])}")
        shutil.rmtree(work / "resharded", ignore_errors=True)
    return phases


def _steps_per_sec(summary: dict, world: int, batch: int) -> float | None:
    images = summary.get("images_per_sec")
    return None if images is None else round(images / (world * batch), 4)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _describe(phase: PhaseResult) -> str:
    peaks = ", ".join(f"{b / 2**30:.2f}" for b in phase.peak_rss_bytes)
    extra = " ".join(f"{k}={v}" for k, v in phase.detail.items())
    return f"{phase.phase}: {'ok' if phase.ok else 'FAILED'} in {phase.seconds:.1f} s, peak RSS GiB [{peaks}] {extra}"
