"""Per-rank memory of the class-partitioned head, and the most classes a per-rank budget holds.

    python tools/plan_memory.py --classes 2000000 --world 8 --dim 512 --batch 128 --sample-rate 0.1 --budget-gb 80

Prints, for the busiest rank (shards may be uneven: ClassPartition gives the extra classes to the
first ranks), the bytes of W, its optimizer state, the cluster bank and phi, the feature queue,
and the peak of one head step (logits and the float32 softmax/gradient buffers, W's gradient,
gathered features); with --budget-gb, the largest class count whose busiest rank fits.
See largefr/train/memory_plan.py for what each line counts; tools/scale_classes.py checks it
against measurements.
"""
from __future__ import annotations

import argparse
import json
import sys

from largefr.train.memory_plan import (
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    PlanInputs,
    format_plan,
    max_classes_within,
    plan_memory,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, required=True, help="total number of classes K")
    parser.add_argument("--world", type=int, required=True, help="ranks sharing the classes")
    parser.add_argument("--dim", type=int, required=True, help="embedding size d")
    parser.add_argument("--batch", type=int, required=True, help="per-rank batch B (global B_g = world * B)")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate in (0, 1]")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="logits GEMM dtype")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="head optimizer (state per row)")
    parser.add_argument("--chunk-size", type=int, default=0, help="low-memory head block width (0: default head)")
    parser.add_argument("--no-bank", action="store_true", help="no cluster bank / feature queue (plain Partial FC)")
    parser.add_argument("--queue-size", type=int, default=8192, help="feature queue rows (cluster.queue_size)")
    parser.add_argument("--budget-gb", type=float, default=None, help="per-rank budget in GiB: report the most "
                                                                          "classes that fit")
    parser.add_argument("--json", default=None, help="write the plan to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        inputs = PlanInputs(num_classes=args.classes, world_size=args.world, dim=args.dim, batch=args.batch,
                            sample_rate=args.sample_rate, precision=args.precision, optimizer=args.optimizer,
                            chunk_size=args.chunk_size, bank=not args.no_bank, queue_size=args.queue_size)
    except ValueError as error:
        print(f"plan_memory: {error}", file=sys.stderr)
        return 2
    plan = plan_memory(inputs)
    print(format_plan(plan, inputs))
    report = dict(inputs=vars(args), plan=plan.as_dict())
    if args.budget_gb is not None:
        budget = int(args.budget_gb * GIB)
        largest = max_classes_within(inputs, budget)
        fits = plan.total <= budget
        print(f"\nbudget {args.budget_gb:g} GiB/rank: {args.classes:,} classes {'fit' if fits else 'do NOT fit'}; "
              f"at most {largest:,} classes fit on {args.world} ranks with these settings")
        report.update(budget_gb=args.budget_gb, fits=fits, max_classes=largest)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
