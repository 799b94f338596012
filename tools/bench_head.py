"""Benchmark the sharded margin head: forward+backward time against the floor of its three GEMMs.

    python tools/bench_head.py --batch-size 256 --classes 200000 --embedding-size 512 --world 2

Spawns `--world` ranks (gloo on CPU, or nccl with one GPU per rank when enough GPUs are present).
`--batch-size` is the per-rank batch B (global batch B_g = world * B). Per rank it reports:

* step_ms: median wall time of head forward + backward (all-gather, sampling, logits, margin,
  sharded cross entropy, backward into W and the embeddings), after `--warmup` steps.
* gemm_ms: median time of the same-shaped matrix products alone, timed in the same run between
  the steps: logits = F(B_g x d) @ W(S x d)^T, dF = G(B_g x S) @ W, dW = G^T @ F, in the logits
  dtype, each writing a fresh output like the step does.
* gemm_floor_ratio = step_ms / gemm_ms.
* peak_mem_mb: head tensors only. CPU: bytes of the tensors alive before the step (W rows, local
  embeddings, labels) plus the peak of the running sum of every allocation/free recorded by torch's
  CPU memory profiler during one extra forward+backward. GPU: torch.cuda.max_memory_allocated.

`--weight-dtype bf16` stores W in bfloat16 (head.weight_dtype); its gathered rows are upcast to float32.
`--chunk-size N` measures the low-memory head (logits over blocks of N classes, recomputed in
backward); the GEMM floor stays the default mode's three GEMMs. The JSON also holds each rank's loss.
`--type X` (a head.type) measures that margin and times an ArcFace head of the same shapes right after
it in every repeat, then prints both step times and their ratio per repeat.
`--clock cpu` times each rank process's CPU time instead of elapsed time (CPU runs): on a machine shared
with other jobs, time slices they take do not count, so a ratio of two steps compares their work.
`--chunk-size N --paired-default` also builds the default head (same W, same data) and times its step
right after the low-memory step in every repeat (a fair ratio on a shared, noisy machine), then
prints a second table: both step times, both peak memories and both losses.
The measuring code lives in `largefr.perf.head_bench` (shared with tools/scale_classes.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from largefr.cli import PRECISION_NAMES, add_option
from largefr.choices import ADAPTIVE_MARGIN_TYPES, MARGIN_TYPES, TORCH_DTYPE_NAMES, WEIGHT_DTYPES
from largefr.perf.head_bench import CLOCKS, HeadBenchSettings, machine_description, run_head_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option(parser, "--batch-size", renamed_from=("--batch",), dest="batch", type=int, required=True, metavar="B",
               help="images per rank B (per process; global batch B_g = world * B)")
    parser.add_argument("--classes", type=int, required=True, help="total number of classes K")
    add_option(parser, "--embedding-size", renamed_from=("--dim",), dest="dim", type=int, required=True, metavar="D",
               help="embedding size d")
    parser.add_argument("--world", type=int, required=True, help="number of ranks to spawn")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate in (0, 1]")
    add_option(parser, "--precision", renamed_from=("--dtype",), old_values=PRECISION_NAMES,
               choices=sorted(TORCH_DTYPE_NAMES), default="fp32", help="logits (GEMM) precision")
    parser.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                        help="storage of W (head.weight_dtype): bf16 rows are upcast after the gather")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="low-memory head: classes per block (0: default head)")
    parser.add_argument("--type", default="arcface", choices=MARGIN_TYPES + ADAPTIVE_MARGIN_TYPES,
                        help="margin of the head (head.type); other than arcface, an ArcFace head of the same "
                             "shapes is timed right after it in every repeat")
    parser.add_argument("--paired-default", action="store_true",
                        help="with --chunk-size: also time the default head in the same run, step by step")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: elapsed time; cpu: each rank process's CPU time (CPU runs), not inflated by other "
                             "processes' time slices on a shared machine")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / world)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.classes < args.world or args.dim < 1 or args.world < 1 or args.repeats < 1:
        parser.error("need --batch-size >= 1, --embedding-size >= 1, --repeats >= 1 and --classes >= --world >= 1")
    if args.chunk_size < 0:
        parser.error("need --chunk-size >= 0")
    if args.paired_default and args.type != "arcface":
        parser.error("--paired-default pairs the low-memory ArcFace head with the default one; with --type the "
                     "pair is the ArcFace head: drop one of them")
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    return args


def print_paired(ranks: list[dict], label: str = "default", measured: str = "low-memory") -> None:
    print(f"\nsame run, {label} head timed right after each {measured} step:")
    print(f"| rank | {label} step_ms | {measured} step_ms | time ratio (per repeat) | {label} peak_mem_mb | "
          f"{measured} peak_mem_mb | memory ratio | loss difference |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in ranks:
        per_repeat = ", ".join(f"{ratio:.2f}" for ratio in r[f"step_ratio_to_{label}"])
        print(f"| {r['rank']} | {r[f'{label}_step_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['step_ms'] / r[f'{label}_step_ms']:.3f} ({per_repeat}) | {r[f'{label}_peak_mem_mb']:.1f} | "
              f"{r['peak_mem_mb']:.1f} | {r['peak_mem_mb'] / r[f'{label}_peak_mem_mb']:.3f} | "
              f"{abs(r['loss'] - r[f'{label}_loss']):.1e} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = HeadBenchSettings(batch=args.batch, classes=args.classes, dim=args.dim, world=args.world,
                                 sample_rate=args.sample_rate, dtype=TORCH_DTYPE_NAMES[args.precision],
                                 weight_dtype=TORCH_DTYPE_NAMES[args.weight_dtype], chunk_size=args.chunk_size,
                                 repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                 paired_default=args.paired_default, margin_type=args.type, clock=args.clock)
    ranks = run_head_bench(settings)
    report = dict(command="python tools/bench_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine_description(args.world), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, threads_per_rank=args.threads, batch_per_rank=args.batch,
                  classes=args.classes, dim=args.dim, world=args.world, sample_rate=args.sample_rate,
                  dtype=TORCH_DTYPE_NAMES[args.precision], precision=args.precision,
                  weight_dtype=args.weight_dtype, chunk_size=args.chunk_size,
                  margin_type=args.type, clock=args.clock, ranks=ranks)
    print(f"{report['command']}\n{report['machine']}, torch {report['torch']}, {args.threads} thread(s)/rank, "
          f"{args.clock} clock")
    print("| rank | num_local | sampled | step_ms | gemm_ms | gemm_floor_ratio | peak_mem_mb |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(f"| {r['rank']} | {r['num_local']} | {r['num_sampled']} | {r['step_ms']:.1f} | {r['gemm_ms']:.1f} | "
              f"{r['gemm_floor_ratio']:.3f} | {r['peak_mem_mb']:.1f} |")
    if "default_step_ms" in ranks[0]:
        print_paired(ranks)
    if "arcface_step_ms" in ranks[0]:
        print_paired(ranks, "arcface", args.type)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
