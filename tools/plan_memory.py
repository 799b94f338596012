"""Per-rank memory of the class-partitioned head, and the most classes a per-rank budget holds.

    python tools/plan_memory.py --classes 2000000 --world 8 --dim 512 --batch 128 --sample-rate 0.1 --budget-gb 80

Prints, for the busiest rank (shards may be uneven: ClassPartition gives the extra classes to the
first ranks), the bytes of W, its optimizer state, the cluster bank and phi, the feature queue,
and the peak of one head step (logits and the float32 softmax/gradient buffers, W's gradient,
gathered features); with --budget-gb, the largest class count whose busiest rank fits, for each phase
of a run (training step, checkpoint save, resume on --resume-world ranks, class-mean warm start; the
reshard tool holds one block whatever the class count), and which phase limits it. --reserve-gb is the
memory per rank the planner does not count (the process, backbone and engine; tools/scale_run.py
measures it as "base").
See largefr/perf/memory_plan.py for what each line counts; tools/scale_classes.py checks it
against measurements.
"""
from __future__ import annotations

import argparse
import sys

from largefr.cli import run_tool, write_json
from largefr.perf.memory_plan import GIB, format_plan, max_classes_per_phase, plan_memory
from largefr.perf.plan_options import add_plan_options, plan_inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_plan_options(parser)
    parser.add_argument("--budget-gb", type=float, default=None, help="per-rank budget in GiB: report the most "
                                                                          "classes that fit")
    parser.add_argument("--reserve-gb", type=float, default=0.0, help="per-rank memory outside the head (process, "
                        "backbone, engine), counted against the budget")
    parser.add_argument("--resume-world", type=int, default=None, help="ranks that resume the checkpoint "
                        "(default: --world)")
    parser.add_argument("--json", default=None, help="write the plan to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("plan_memory", lambda: _plan(args))


def _plan(args: argparse.Namespace) -> int:
    inputs = plan_inputs(args)
    plan = plan_memory(inputs)
    print(format_plan(plan, inputs))
    report = dict(inputs=vars(args), plan=plan.as_dict())
    if args.budget_gb is not None:
        budget, reserve = int(args.budget_gb * GIB), int(args.reserve_gb * GIB)
        per_phase = max_classes_per_phase(inputs, budget, resume_world=args.resume_world, base_bytes=reserve)
        largest = per_phase["training step"]
        fits = reserve + plan.total <= budget
        print(f"\nbudget {args.budget_gb:g} GiB/rank ({args.reserve_gb:g} reserved outside the head): "
              f"{args.classes:,} classes {'fit' if fits else 'do NOT fit'}; "
              f"at most {largest:,} classes fit on {args.world} ranks with these settings")
        print("\n| phase | most classes that fit |\n|---|---:|")
        for phase, classes in per_phase.items():
            print(f"| {phase} | {classes:,} |")
        limit = min(per_phase, key=per_phase.get)
        print(f"limited by: {limit} ({per_phase[limit]:,} classes; resume on {args.resume_world or args.world} "
              "ranks; the reshard tool holds one block whatever the class count)")
        report.update(budget_gb=args.budget_gb, reserve_gb=args.reserve_gb, fits=fits, max_classes=largest,
                      max_classes_per_phase=per_phase, limited_by=limit)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
