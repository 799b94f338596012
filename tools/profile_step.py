"""Where a training step's time goes: real largefr training steps, timed phase by phase.

    python tools/profile_step.py --config CFG [--steps N] [--warmup W] [--json PATH] [--trace DIR] [--png PATH]
                                 [--set KEY=VALUE ...]

Launched like training: plain python (1 rank), `torchrun --nproc_per_node N tools/profile_step.py ...`
or `deepspeed --num_gpus N tools/profile_step.py ...`. Builds the trainer from the config exactly as
`launch/train.py` does (output goes to <output>/profile; no verification, no checkpoints), runs W
warm-up steps, then N timed steps with a `PhaseTimer` in the step (`largefr.perf.profiling.profile_steps`,
which drives the trainer's own step iterator and `Trainer.run_step`) (the device is synchronised at
every phase boundary, so profiled steps are a little slower than unprofiled ones), and prints per
phase the mean milliseconds per step and the share of the step, images/s, peak memory per rank and,
on a known GPU, the model FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from largefr.train.huge_pages import use_huge_pages

use_huge_pages()  # before torch allocates: the step is timed as launch/train.py runs it

import torch  # noqa: E402

from largefr.perf.profiling import PhaseTimer, config_step_flops, load_profile_config, peak_tflops, profile_steps

PHASES = ("data_wait", "momentum_forward", "backbone_forward", "feature_gather", "loss_cg", "loss_con", "loss_ali",
          "head_other", "backbone_backward", "optimizer_engine", "optimizer_head", "ema_update", "other")
"""Every phase reported (0 when absent, e.g. loss_con with cluster.contrastive_weight=0)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (JSON or YAML)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--json", default=None, help="write the report here (rank 0)")
    parser.add_argument("--png", default=None, help="bar chart of the phases (needs matplotlib)")
    parser.add_argument("--trace", default=None, help="torch.profiler trace of the timed steps, one file per rank")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def rank_report(trainer, timer, *, wall: float, steps: int, rank: int) -> dict[str, Any]:
    from largefr.train.metrics import peak_memory_bytes

    phases = {name: timer.totals.get(name, 0.0) / steps for name in PHASES}
    unknown = sorted(set(timer.totals) - set(PHASES))
    if unknown:
        raise RuntimeError(f"phases {unknown} are not in tools/profile_step.py PHASES; add them there")
    return {"rank": rank, "step_seconds": wall / steps, "cpu_seconds": timer.cpu_seconds() / steps,
            "phases_seconds": phases, "peak_memory_bytes": peak_memory_bytes(trainer.runner.device)}


def mfu_report(config, trainer, step_seconds: float, world_size: int) -> dict[str, Any] | None:
    """Model FLOPs utilisation on a GPU of the peak-rate table; None on CPU."""
    device = trainer.runner.device
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, config.train.precision)
    flops = config_step_flops(config, world_size=world_size,
                              momentum_encoder=trainer.runner.momentum_encoder is not None,
                              sampled_classes=trainer.runner.head.margin_head.num_sample)
    achieved = flops / step_seconds / 1e12
    return {"device_name": name, "precision": config.train.precision, "flops_per_step_per_rank": flops,
            "achieved_tflops_per_rank": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None}


def summarize(config, ranks: list[dict], mfu: dict | None, *, world_size: int, steps: int, warmup: int) -> dict:
    step_seconds = max(r["step_seconds"] for r in ranks)  # the slowest rank sets the pace
    phases = {name: sum(r["phases_seconds"][name] for r in ranks) / len(ranks) for name in PHASES}
    global_batch = config.global_batch_size(world_size)
    return {
        "config": {"network": config.model.network, "image_size": config.data.image_size,
                   "loader": config.data.loader, "precision": config.train.precision,
                   "zero_stage": config.train.zero_stage, "num_classes": config.data.num_classes},
        "world_size": world_size, "steps": steps, "warmup": warmup, "global_batch": global_batch,
        "device": str(ranks[0].get("device", "")), "date": time.strftime("%Y-%m-%d"),
        "step_seconds": step_seconds, "images_per_sec": global_batch / step_seconds,
        "phases_seconds": phases, "phases_sum_seconds": sum(phases.values()),
        "data_wait_fraction": phases["data_wait"] / step_seconds,
        "ranks": ranks, "mfu": mfu,
    }


def format_table(report: dict) -> str:
    step = report["step_seconds"]
    lines = [f"{'phase':<20}{'ms/step':>10}{'share':>8}", "-" * 38]
    for name, seconds in report["phases_seconds"].items():
        lines.append(f"{name:<20}{seconds * 1e3:>10.2f}{seconds / step:>8.1%}")
    total = report["phases_sum_seconds"]
    lines += ["-" * 38, f"{'sum of phases':<20}{total * 1e3:>10.2f}{total / step:>8.1%}",
              f"{'measured step':<20}{step * 1e3:>10.2f}",
              (f"images/s {report['images_per_sec']:.1f} (global batch {report['global_batch']}, "
               f"{report['world_size']} rank(s)); data wait {report['data_wait_fraction']:.1%} of the step")]
    for r in report["ranks"]:
        lines.append(f"rank {r['rank']}: peak memory {r['peak_memory_bytes'] / 2**20:.1f} MiB")
    mfu = report["mfu"]
    if mfu is not None:
        lines.append(f"{mfu['device_name']} {mfu['precision']}: {mfu['achieved_tflops_per_rank']:.1f} TFLOP/s per rank"
                     + (f", MFU {mfu['mfu']:.1%} of {mfu['peak_tflops']} TFLOP/s" if mfu["mfu"] is not None
                        else " (no peak rate known for this GPU/precision)"))
    return "\n".join(lines)


def write_png(report: dict, path: str) -> bool:
    """Horizontal bar chart of ms/step per phase; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("profile: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
        return False
    names = list(report["phases_seconds"])
    values = [report["phases_seconds"][n] * 1e3 for n in names]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.barh(names[::-1], values[::-1])
    axes.set_xlabel("ms per step (mean over ranks)")
    axes.set_title(f"{report['config']['network']} x{report['world_size']} rank(s): "
                   f"{report['images_per_sec']:.0f} img/s, data wait {report['data_wait_fraction']:.1%}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def profile(args: argparse.Namespace) -> dict | None:
    """Build, run, gather every rank's numbers on rank 0; returns the report there (None elsewhere)."""
    import torch.distributed as dist

    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed
    from largefr.train.run import limit_cpu_threads

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = load_profile_config(args.config, args.set, world_size)
    env = init_distributed()
    if env.device.type == "cpu":
        limit_cpu_threads()
    trainer = build_trainer(config, env)
    try:
        timer = PhaseTimer(env.device)
        wall = profile_steps(trainer, timer, steps=args.steps, warmup=args.warmup, trace_dir=args.trace)
        mine = {**rank_report(trainer, timer, wall=wall, steps=args.steps, rank=env.rank), "device": str(env.device)}
    finally:
        trainer.metrics.close()
    ranks = [None] * env.world_size
    if dist.is_initialized():
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if env.rank != 0:
        return None
    slowest = max(r["step_seconds"] for r in ranks)
    return summarize(config, ranks, mfu_report(config, trainer, slowest, env.world_size),
                     world_size=env.world_size, steps=args.steps, warmup=args.warmup)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from largefr.train.distributed_env import shutdown_distributed

    finished = False
    try:
        report = profile(args)
        finished = True
    finally:
        shutdown_distributed(wait_for_peers=finished)
    if report is None:
        return 0
    print(format_table(report), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.png:
        write_png(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
