"""Head step time and peak head memory per rank over class counts and world sizes, beside the planner.

    python tools/scale_classes.py --classes 10000,100000,1000000 --world 1,2,4 --dim 128 --batch 64

Each (classes, world) point spawns `world` real ranks (gloo on CPU, nccl on GPUs) and measures
the head the way tools/bench_head.py does (`largefr.perf.head_bench`): median step time of forward +
backward, and peak head memory = W + local inputs + the profiled peak of one forward + backward.
Beside it: the planner's `head_step_peak` (largefr.perf.memory_plan) for the busiest rank.

`--batch` is the GLOBAL batch B_g, split evenly over the ranks (strong scaling: the same job on
more ranks), so every per-rank term of the head, logits included (B_g x K/world), falls as 1/world.

Checks (exit status 1 when one fails): planner within `--tolerance` (15%) of the measured peak at
every point, and measured memory per rank x world within the same tolerance of the 1-rank figure.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from largefr.cli import int_list, write_json
from largefr.choices import TORCH_DTYPE_NAMES
from largefr.errors import MissingExtraError
from largefr.perf.head_bench import HeadBenchSettings, machine_description, run_head_bench
from largefr.perf.memory_plan import PlanInputs, plan_memory
from largefr.perf.plan_options import add_head_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int_list, required=True, help="class counts, e.g. 10000,100000,1000000")
    parser.add_argument("--world", type=int_list, required=True, help="world sizes, e.g. 1,2,4")
    parser.add_argument("--batch", type=int, default=64, help="GLOBAL batch B_g, split evenly over the ranks")
    add_head_options(parser, dim=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--tolerance", type=float, default=0.15, help="relative tolerance of both checks")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--png", default=None, help="write a plot (needs matplotlib) to this PNG file")
    args = parser.parse_args(argv)
    uneven = [w for w in args.world if args.batch % w]
    if uneven:
        parser.error(f"--batch {args.batch} (global) must split evenly over every --world; not over {uneven}")
    if min(args.classes) < max(args.world):
        parser.error("every --classes value must be >= the largest --world (each rank owns a class)")
    return args


def measure_point(args: argparse.Namespace, classes: int, world: int) -> dict:
    settings = HeadBenchSettings(batch=args.batch // world, classes=classes, dim=args.dim, world=world,
                                 sample_rate=args.sample_rate, dtype=TORCH_DTYPE_NAMES[args.precision],
                                 weight_dtype=TORCH_DTYPE_NAMES[args.weight_dtype],
                                 chunk_size=args.chunk_size, repeats=args.repeats, warmup=args.warmup,
                                 gemm_floor=False)
    ranks = run_head_bench(settings)
    plan = plan_memory(PlanInputs(num_classes=classes, world_size=world, dim=args.dim, batch=args.batch // world,
                                  sample_rate=args.sample_rate, precision=args.precision,
                                  weight_dtype=args.weight_dtype, optimizer="none",
                                  chunk_size=args.chunk_size, bank=False))
    measured = max(r["peak_mem_mb"] for r in ranks)
    planned = plan.head_step_peak / 2**20
    return dict(classes=classes, world=world, num_local=plan.num_local, num_sampled=plan.num_sampled,
                step_ms=max(r["step_ms"] for r in ranks), measured_mb=measured, planned_mb=planned,
                planned_over_measured=planned / measured, threads_per_rank=settings.threads,
                plan_peak_phase=plan.peak_phase, ranks=ranks)


def add_scaling(points: list[dict]) -> None:
    """memory x world / memory at the smallest world, per class count (1.0 = perfect 1/world)."""
    for point in points:
        base = min((p for p in points if p["classes"] == point["classes"]), key=lambda p: p["world"])
        point["scaling"] = point["measured_mb"] * point["world"] / (base["measured_mb"] * base["world"])


def check(points: list[dict], tolerance: float) -> list[str]:
    failures = []
    for p in points:
        if abs(p["planned_over_measured"] - 1.0) > tolerance:
            failures.append(f"classes={p['classes']} world={p['world']}: planner {p['planned_mb']:.1f} MiB vs "
                            f"measured {p['measured_mb']:.1f} MiB ({p['planned_over_measured'] - 1:+.1%})")
        if abs(p["scaling"] - 1.0) > tolerance:
            failures.append(f"classes={p['classes']} world={p['world']}: memory x world is {p['scaling']:.3f} x "
                            "the smallest world's (expected 1/world scaling)")
    return failures


def print_table(points: list[dict]) -> None:
    print("| classes | world | local classes (rank 0) | step_ms | measured peak MiB/rank | planned MiB/rank | "
          "planned / measured | MiB x world / smallest world |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        print(f"| {p['classes']} | {p['world']} | {p['num_local']} | {p['step_ms']:.1f} | {p['measured_mb']:.1f} | "
              f"{p['planned_mb']:.1f} | {p['planned_over_measured']:.3f} | {p['scaling']:.3f} |")


def plot(points: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError('--png needs matplotlib: pip install "largefr[eval]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(13, 4))
    for classes in sorted({p["classes"] for p in points}):
        series = sorted((p for p in points if p["classes"] == classes), key=lambda p: p["world"])
        worlds = [p["world"] for p in series]
        line, = memory_axis.plot(worlds, [p["measured_mb"] for p in series], "o-", label=f"{classes} measured")
        memory_axis.plot(worlds, [p["planned_mb"] for p in series], "x--", color=line.get_color(),
                         label=f"{classes} planned")
        time_axis.plot(worlds, [p["step_ms"] for p in series], "o-", label=f"{classes} classes")
    worlds = sorted({p["world"] for p in points})
    for axis, label in ((memory_axis, "peak head memory per rank (MiB)"), (time_axis, "head step time (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(worlds, [str(world) for world in worlds])  # plain 1, 2, 4: not 2^0, 2^1, 2^2
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_xlabel("world size (ranks)")
        axis.set_ylabel(label)
    # legends beside the plots, not over their points
    memory_axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    time_axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    points = [measure_point(args, classes, world) for classes in args.classes for world in args.world]
    add_scaling(points)
    report = dict(command="python tools/scale_classes.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine_description(max(args.world)), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, global_batch=args.batch, dim=args.dim, sample_rate=args.sample_rate,
                  precision=args.precision, chunk_size=args.chunk_size, points=points)
    print(f"{report['command']}\n{report['machine']}, torch {report['torch']}; global batch {args.batch}, "
          f"d = {args.dim}, sample rate {args.sample_rate}, logits {args.precision}, chunk_size {args.chunk_size}")
    print_table(points)
    failures = check(points, args.tolerance)
    report["failures"] = failures
    print("checks: " + ("all points pass" if not failures else "FAILED\n  " + "\n  ".join(failures)))
    if args.json:
        write_json(args.json, report)
    if args.png:
        plot(points, args.png)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
