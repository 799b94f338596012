"""Training throughput without instrumentation: images/s, MFU and peak memory of N plain training steps.

    python tools/gpu_throughput.py --config CFG [--steps N] [--warmup W] [--json PATH] [--set KEY=VALUE ...]

The headline numbers of tools/gpu_acceptance.sh. The trainer is built from the config as
`launch/train.py` builds it (output under <output>/profile, no verification, no checkpoints, as
tools/profile_step.py does), W steps run untimed, then N steps run back to back with the device
synchronised only before and after them: no phase timer, so unlike tools/profile_step.py's phase
table nothing here waits for the device inside a step. The data wait of the loader is part of the
timed steps. Peak memory is that of the timed steps (allocated and reserved by torch's CUDA
allocator). One rank (plain python); the MFU's definition is printed with it and saved in the JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from largefr.cli import write_json
from largefr.perf.profiling import config_step_flops, load_profile_config, peak_tflops

MFU_DEFINITION = (
    "model FLOPs of one step (backbone forward + backward = 3 x its forward FLOPs x local batch, plus the "
    "head's three GEMMs 6 x B_g x d x S_sampled) / step time / the card's dense peak for train.precision "
    "(largefr.perf.profiling.PEAK_TFLOPS). The momentum encoder's forward runs in fp32 and is NOT counted; "
    "'momentum_fp32_peak_fraction' is the share of the step it would take at the card's fp32 peak.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (JSON or YAML)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def timed_steps(trainer, *, steps: int, warmup: int) -> float:
    """Wall seconds of `steps` plain training steps after `warmup` untimed ones (device synchronised around)."""
    device = trainer.runner.device
    source = trainer.step_batches()
    try:
        for index in range(warmup + steps):
            if index == warmup:
                _synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
            trainer.run_step(next(source))
            trainer.state.step = (trainer.state.step + 1) % max(trainer.plan.total_steps, 1)  # stay in the schedule
        _synchronize(device)
        return time.perf_counter() - started
    finally:
        source.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu_numbers(config, trainer, step_seconds: float) -> dict[str, Any]:
    """MFU per MFU_DEFINITION, and the momentum encoder's fp32 forward as a share of the step at the fp32 peak."""
    from largefr.models import model_flops

    device = trainer.runner.device
    if device.type != "cuda":
        return {"device_name": "cpu", "mfu": None, "momentum_fp32_peak_fraction": None, "peak_tflops": None}
    name = torch.cuda.get_device_name(device)
    flops = config_step_flops(config, world_size=1, momentum_encoder=False,
                              sampled_classes=trainer.runner.head.margin_head.num_sample)
    peak, peak_fp32 = peak_tflops(name, config.train.precision), peak_tflops(name, "fp32")
    momentum = 0
    if trainer.runner.momentum_encoder is not None:
        forward = model_flops(config.model.network, config.data.image_size, embedding_size=config.model.embedding_size)
        momentum = forward * config.train.batch_size * config.train.gradient_accumulation_steps
    achieved = flops / step_seconds / 1e12
    return {"device_name": name, "flops_per_step": flops, "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None, "momentum_forward_flops_per_step": momentum,
            "momentum_fp32_peak_fraction": momentum / 1e12 / peak_fp32 / step_seconds if peak_fp32 else None}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed
    from largefr.train.run import limit_cpu_threads

    config = load_profile_config(args.config, args.set, 1)
    env = init_distributed()
    if env.device.type == "cpu":
        limit_cpu_threads()
    trainer = build_trainer(config, env)
    try:
        wall = timed_steps(trainer, steps=args.steps, warmup=args.warmup)
    finally:
        trainer.metrics.close()
    step_seconds = wall / args.steps
    cuda = env.device.type == "cuda"
    return {"config": {"network": config.model.network, "image_size": config.data.image_size,
                       "loader": config.data.loader, "precision": config.train.precision,
                       "zero_stage": config.train.zero_stage, "batch_size": config.train.batch_size},
            "date": time.strftime("%Y-%m-%d"), "device": str(env.device), "steps": args.steps, "warmup": args.warmup,
            "global_batch": config.global_batch_size(1), "step_seconds": step_seconds,
            "images_per_sec": config.global_batch_size(1) / step_seconds,
            "peak_memory_mib": {"allocated": torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else None,
                                "reserved": torch.cuda.max_memory_reserved(env.device) / 2**20 if cuda else None},
            **mfu_numbers(config, trainer, step_seconds), "mfu_definition": MFU_DEFINITION}


def format_report(report: dict[str, Any]) -> str:
    memory = report["peak_memory_mib"]
    mfu = "n/a (no GPU or no peak rate known)" if report["mfu"] is None else f"{report['mfu']:.1%}"
    return "\n".join([
        f"{report['config']['network']} {report['config']['image_size']} px {report['config']['precision']} on "
        f"{report['device_name']}: {report['images_per_sec']:.1f} images/s "
        f"({report['step_seconds'] * 1e3:.2f} ms/step, "
        f"global batch {report['global_batch']}, {report['steps']} steps after {report['warmup']})",
        f"MFU {mfu}; peak memory allocated {memory['allocated']} MiB, reserved {memory['reserved']} MiB",
        f"MFU = {report['mfu_definition']}"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from largefr.train.distributed_env import shutdown_distributed

    finished = False
    try:
        report = measure(args)
        finished = True
    finally:
        shutdown_distributed(wait_for_peers=finished)
    print(format_report(report), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
