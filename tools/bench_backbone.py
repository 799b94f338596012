"""Benchmark a backbone's training step: images/s with and without train.compile / train.channels_last, and
the peak memory of one step with and without model.activation_checkpointing, A/B in one run.

    python tools/bench_backbone.py --network r50 --image-size 112 --batch-size 128 --variants eager,compile,channels_last
    python tools/bench_backbone.py --network vit_b --batch-size 128 --memory-only

A step is what the trainer asks of the backbone: forward of a synthetic batch (random images, fixed for the
run), a loss on the embeddings, backward, an SGD step (DeepSpeed's engine and the margin head left out: they
do not change with these switches). Every variant is its own copy of the same initial weights, prepared as
largefr/train/compile.py prepares the engine's module. Speed: each variant runs `--warmup` steps (the first
one compiles; its extra time is reported as compile_s), then `--rounds` rounds time `--steps` steps of every
variant in turn, so drift of a shared machine hits all variants alike; the ratio to the first variant is
taken round by round and its median reported. Memory: the bytes one forward + backward allocates above what
was allocated before it (CUDA: max_memory_allocated; CPU: torch's memory profiler), after one warm-up step,
without and with activation checkpointing. `--json FILE` writes everything.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from largefr.cli import add_option, write_json
from largefr.choices import PRECISIONS, TORCH_DTYPE_NAMES
from largefr.models import NETWORK_NAMES, get_model
from largefr.perf.head_bench import cuda_peak_increment, profiled_peak_increment
from largefr.train.compile import EagerFallback, use_channels_last

VARIANTS = ("eager", "compile", "channels_last", "compile+channels_last")
DTYPES = {name: getattr(torch, TORCH_DTYPE_NAMES[name]) for name in PRECISIONS}


@dataclass(kw_only=True)
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    fallback: EagerFallback | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(model: nn.Module, images: torch.Tensor) -> None:
    model(images).float().square().mean().backward()


def _step(variant: Variant, images: torch.Tensor) -> None:
    variant.optimizer.zero_grad(set_to_none=True)
    _forward_backward(variant.model, images)
    variant.optimizer.step()


def build_variant(name: str, base: nn.Module, backend: str) -> Variant:
    model = copy.deepcopy(base)
    fallback = None
    if "channels_last" in name:
        use_channels_last(model)
    if "compile" in name:
        fallback = EagerFallback(backend)
        model.compile(backend=fallback)
    return Variant(name=name, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9),
                   fallback=fallback)


def timed_steps(variant: Variant, images: torch.Tensor, steps: int) -> float:
    _synchronize(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        _step(variant, images)
    _synchronize(images.device)
    return time.perf_counter() - start


def progress(message: str) -> None:
    """A timestamped line on stderr: every phase says when it starts (a compile takes minutes on a CPU)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_speed(base: nn.Module, images: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    variants = [build_variant(name, base, args.backend) for name in args.variants]
    results = []
    for variant in variants:
        progress(f"{variant.name}: {args.warmup} warm-up step(s)"
                 + (" (the first compiles: minutes on a CPU)" if variant.fallback else ""))
        first = timed_steps(variant, images, 1)
        rest = timed_steps(variant, images, max(args.warmup - 1, 1))
        results.append({"variant": variant.name, "first_step_s": first,
                        "compile_s": max(first - rest / max(args.warmup - 1, 1), 0.0) if variant.fallback else 0.0,
                        "round_images_per_s": []})
    for round_number in range(args.rounds):
        progress(f"round {round_number + 1}/{args.rounds}: {args.steps} timed step(s) of each variant")
        for variant, result in zip(variants, results):
            seconds = timed_steps(variant, images, args.steps)
            result["round_images_per_s"].append(args.steps * images.shape[0] / seconds)
    for variant, result in zip(variants, results):
        rounds = result["round_images_per_s"]
        result["images_per_s"] = statistics.median(rounds)
        result["ratio_to_first"] = statistics.median(a / b for a, b in zip(rounds, results[0]["round_images_per_s"]))
        result["fell_back"] = variant.fallback.failure if variant.fallback else None
    return results


def peak_step_bytes(model: nn.Module, images: torch.Tensor) -> int:
    _forward_backward(model, images)  # warm-up: allocator caches, lazily built kernels
    model.zero_grad(set_to_none=True)
    if images.device.type == "cuda":
        return cuda_peak_increment(lambda: _forward_backward(model, images), images.device)
    return profiled_peak_increment(lambda: _forward_backward(model, images))


def measure_memory(args: argparse.Namespace, images: torch.Tensor, dtype: torch.dtype) -> dict:
    peaks = {}
    for checkpointing in (False, True):
        progress(f"memory: one step {'with' if checkpointing else 'without'} activation checkpointing")
        torch.manual_seed(args.seed)
        model = _backbone(args, dtype, images.device, activation_checkpointing=checkpointing)
        peaks["checkpointing" if checkpointing else "plain"] = peak_step_bytes(model, images) / 2**20
        del model
    return {"plain_mib": peaks["plain"], "checkpointing_mib": peaks["checkpointing"],
            "ratio": peaks["checkpointing"] / peaks["plain"]}


def _backbone(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, **options) -> nn.Module:
    model = get_model(args.network, embedding_size=args.embedding_size, image_size=args.image_size, **options)
    return model.to(device=device, dtype=dtype).train()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=NETWORK_NAMES, default="r50")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--embedding-size", type=int, default=512)
    add_option(parser, "--batch-size", renamed_from=("--batch",), dest="batch", type=int, default=128, metavar="N",
               help="images per step, in this one process (default 128)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="dtype of weights and images, as the engine casts them (default fp32)")
    parser.add_argument("--variants", default="eager,compile", type=lambda text: text.split(","),
                        help=f"comma-separated, from {', '.join(VARIANTS)}; ratios are to the first")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (train.compile_backend)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (the first compiles)")
    parser.add_argument("--memory-only", action="store_true", help="only the activation-checkpointing memory")
    parser.add_argument("--speed-only", action="store_true", help="only the images/s of the variants")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if min(args.batch, args.steps, args.rounds, args.warmup) < 1:
        parser.error("--batch, --steps, --rounds and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.precision]
    torch.manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    report = {"network": args.network, "image_size": args.image_size, "batch": args.batch,
              "precision": args.precision, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"{args.network} {args.image_size}px batch {args.batch} {args.precision} on {report['device']} "
          f"(torch {torch.__version__}, {report['threads']} threads)")
    if not args.memory_only:
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            report["speed"] = measure_speed(_backbone(args, dtype, device), images, args)
        print(f"{'variant':24}{'images/s':>10}{'ratio':>8}{'compile s':>11}  fell back")
        for row in report["speed"]:
            print(f"{row['variant']:24}{row['images_per_s']:10.1f}{row['ratio_to_first']:8.3f}"
                  f"{row['compile_s']:11.1f}  {row['fell_back'] or '-'}")
    if not args.speed_only:
        memory = report["memory"] = measure_memory(args, images, dtype)
        print(f"peak step memory: plain {memory['plain_mib']:.1f} MiB, activation checkpointing "
              f"{memory['checkpointing_mib']:.1f} MiB (x{memory['ratio']:.3f})")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
