"""Per-rank memory of the class-partitioned head, and the most classes a per-rank budget holds.

    python tools/plan_memory.py --classes 2000000 --world 8 --dim 512 --batch 128 --sample-rate 0.1 --budget-gb 80

Prints, for the busiest rank (shards may be uneven: ClassPartition gives the extra classes to the
first ranks), the bytes of W, its optimizer state, the cluster bank and phi, the feature queue,
and the peak of one head step (logits and the float32 softmax/gradient buffers, W's gradient,
gathered features); with --budget-gb, the largest class count whose busiest rank fits.
See largefr/perf/memory_plan.py for what each line counts; tools/scale_classes.py checks it
against measurements.
"""
from __future__ import annotations

import argparse
import json
import sys

from largefr.perf.memory_plan import GIB, format_plan, max_classes_within, plan_memory
from largefr.perf.plan_options import add_plan_options, plan_inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_plan_options(parser)
    parser.add_argument("--budget-gb", type=float, default=None, help="per-rank budget in GiB: report the most "
                                                                          "classes that fit")
    parser.add_argument("--json", default=None, help="write the plan to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        inputs = plan_inputs(args)
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
