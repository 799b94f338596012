"""The whole trainer at growing class counts: train, checkpoint, resume on other world sizes, reshard, export.

    python tools/scale_run.py --classes 100000,1000000 --world 2 --resume-world 2,1,3 --steps 3 \\
        --json runs/scale/scale.json --png runs/scale/scale.png

For each class count (quickstart MobileFaceNet at 32 px unless --config/--set say otherwise, in-memory
synthetic images, head.sample_rate 0.1, SGD) every phase runs as a real job (`largefr.perf.scale_run`):
steps/s, each process's peak resident memory (the kernel's high-water mark), checkpoint size and the
2->2 resume's losses against the uninterrupted run. Beside each measured peak: the planner's figure
(`largefr.perf.memory_plan.phase_peaks`), plus the program's own memory (libraries, backbone, engine),
taken per program (the trainer, the reshard tool) from the first, smallest point: its measured peak
minus its planned head bytes.
Exit status 1 when a phase fails, the resumed losses differ, or a peak is off the plan by more than
--tolerance.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from largefr.cli import int_list
from largefr.choices import HEAD_OPTIMIZERS
from largefr.config import load_config
from largefr.perf.memory_plan import PlanInputs, phase_peaks
from largefr.perf.scale_run import SCALE_OVERRIDES, run_scale_point

DEFAULT_SET = ["head.sample_rate=0.1", "optim.name=sgd", "model.embedding_size=128", "train.batch_size=32"]
PHASE_OF = {"train": "training step", "resume": "resume", "reshard": "reshard"}
"""Measured phase -> its planner phase (largefr.perf.memory_plan.RUN_PHASES)."""
PROCESS_KIND = {"train": "trainer", "resume": "trainer", "reshard": "reshard tool"}
"""Phases run by the same program share its own (non-head) memory, measured once at the smallest point."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int_list, required=True, help="class counts, smallest first")
    parser.add_argument("--world", type=int, default=2, help="ranks that train (default 2)")
    parser.add_argument("--resume-world", type=int_list, default=[2, 1, 3], help="ranks that resume (default 2,1,3)")
    parser.add_argument("--steps", type=int, default=3, help="steps before the checkpoint (the run takes 2x)")
    parser.add_argument("--config", default="configs/quickstart.json", help="training config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"config overrides after the defaults {' '.join(DEFAULT_SET)}")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed |planned / measured - 1|")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="plot peaks and steps/s against classes (needs matplotlib)")
    return parser.parse_args(argv)


def planned_peak(config, phase: str, world: int, target: int, base: int) -> int | None:
    key = PHASE_OF.get(phase.split()[0])
    if key is None:
        return None
    inputs = PlanInputs(num_classes=config.data.num_classes, world_size=world, dim=config.model.embedding_size,
                        batch=config.train.batch_size, sample_rate=config.head.sample_rate,
                        precision=config.head.logits_dtype, weight_dtype=config.head.weight_dtype,
                        optimizer=HEAD_OPTIMIZERS[config.optim.name],
                        chunk_size=config.head.chunk_size,
                        bank=config.cluster.enabled, queue_size=config.cluster.queue_size, device="cpu")
    return phase_peaks(inputs, resume_world=target, base_bytes=base)[key]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [*DEFAULT_SET, *args.set]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="largefr-scale-"))
    rows, base, failures = [], {}, []
    for classes in args.classes:
        config = load_config(args.config, [*SCALE_OVERRIDES, f"data.num_classes={classes}",
                                           f"data.num_images={classes}", *overrides])
        point_dir = work / f"classes_{classes}"
        phases = run_scale_point(config=args.config, classes=classes, world=args.world,
                                 resume_worlds=args.resume_world, steps=args.steps, batch=config.train.batch_size,
                                 extra=overrides, work=point_dir)
        shutil.rmtree(point_dir, ignore_errors=True)
        for phase in phases:
            row = {"classes": classes, **phase.as_dict()}
            kind = PROCESS_KIND.get(phase.phase.split()[0])
            head_bytes = planned_peak(config, phase.phase, args.world, phase.world, 0)
            if kind is not None and kind not in base:  # the process's own memory, from the smallest point
                base[kind] = max(phase.peak_rss_bytes) - head_bytes
                row["base_gib"] = round(base[kind] / 2**30, 3)
            planned = None if head_bytes is None else head_bytes + base[kind]
            if planned is not None:
                row["planned_gib"] = round(planned / 2**30, 3)
                row["planned_over_measured"] = round(planned / max(phase.peak_rss_bytes), 3)
                if abs(planned / max(phase.peak_rss_bytes) - 1) > args.tolerance and classes != args.classes[0]:
                    failures.append(f"{classes}: {phase.phase} planned {planned / 2**30:.2f} GiB, measured "
                                    f"{max(phase.peak_rss_bytes) / 2**30:.2f}")
            if not phase.ok or False in (row.get("losses_equal"), row.get("final_loss_equal")):
                failures.append(f"{classes}: {phase.phase} {'failed' if not phase.ok else 'losses differ'}")
            rows.append(row)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(["python", "tools/scale_run.py", *(argv or
                                                                                                 sys.argv[1:])]),
                                               "rows": rows, "failures": failures}, indent=2))
    if args.png:
        plot(rows, args.png)
    print("checks: all phases pass" if not failures else "checks FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def print_table(rows: list[dict]) -> None:
    print("| classes | phase | ranks | seconds | peak RSS GiB per rank | planned GiB | steps/s | checkpoint GiB | "
          "losses equal |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['classes']:,} | {row['phase']} | {row['world']} | {row['seconds']} | "
              f"{', '.join(str(v) for v in row['peak_rss_gib'])} | {row.get('planned_gib', '')} | "
              f"{row.get('steps_per_sec') or ''} | {row.get('checkpoint_gib') or ''} | {row.get('losses_equal', '')} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(row["phase"] for row in rows):
        points = [(row["classes"], max(row["peak_rss_gib"])) for row in rows if row["phase"] == phase]
        memory.plot(*zip(*points), marker="o", label=phase)
    memory.set(xscale="log", xlabel="classes", ylabel="peak RSS per rank (GiB)", title="measured peak per phase")
    memory.legend(fontsize=8)
    trains = [(row["classes"], row["steps_per_sec"]) for row in rows if row["phase"] == "train"]
    speed.plot(*zip(*trains), marker="o")
    speed.set(xscale="log", xlabel="classes", ylabel="steps/s", title="training steps/s", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
