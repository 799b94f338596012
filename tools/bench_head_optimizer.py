"""The head's row-sparse optimizer step against torch.optim on the same shard (alternating, one run).

    python tools/bench_head_optimizer.py --rows 5000 --embedding-size 512 --sample-rate 1.0,0.1 --optimizer sgd,adamw

Prints per (optimizer, sample rate) the median step of RowSparseSGD / RowSparseAdamW (stepping the
sampled rows) and of torch.optim.SGD / AdamW (stepping the whole dense shard), and their ratio
(`largefr.perf.optimizer_bench`). torch's step does not depend on the sample rate; ours should follow it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from largefr.cli import write_json
from largefr.perf.optimizer_bench import bench_head_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000, help="rows of the shard (classes on the rank)")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding size d (row width)")
    parser.add_argument("--sample-rate", default="1.0,0.1", help="comma-separated Partial FC rates")
    parser.add_argument("--optimizer", default="sgd,adamw", help="comma-separated: sgd, adamw")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench_head_optimizer(rows=args.rows, dim=args.embedding_size, sample_rate=float(rate),
                                    optimizer=name, repeats=args.repeats)
               for name in args.optimizer.split(",") for rate in args.sample_rate.split(",")]
    print(f"shard {args.rows} x {args.embedding_size} float32, {args.threads} thread(s), median of {args.repeats}")
    print("| optimizer | sample rate | row-sparse ms | torch.optim ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.optimizer} | {r.sample_rate} | {r.row_sparse_ms:.2f} | {r.torch_ms:.2f} | {r.ratio:.2f} |")
    if args.json:
        write_json(args.json, [r.as_dict() for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
