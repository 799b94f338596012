"""Partial FC's whole step at C classes and rate r against C*r classes at rate 1.0 (the same rows), alternating.

    python tools/bench_sampled_step.py --classes 1000000,10000000 --sample-rate 0.1 --rounds 3 --json step.json

Each side is `tools/profile_step.py` on --world gloo ranks (quickstart MobileFaceNet at 32 px unless
--config/--set say otherwise, in-memory synthetic batches, no verification); per round the slower rank's
seconds per step of A (C classes, rate r) and B (C*r classes, rate 1.0), their ratio, each side's CPU seconds
per step and their ratio, the median ratios per class count, and the phases of the last round
(`largefr.perf.sampled_step`). A and B alternate, so a busy machine slows both, though not always alike: the
CPU time, which other processes do not take, says how much of a round's ratio is the machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from largefr.cli import int_list
from largefr.perf.sampled_step import SampledStepPlan, bench_sampled_step, format_report

DEFAULT_SET = ["optim.name=sgd", "model.embedding_size=128"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int_list, required=True, help="class counts C of side A")
    parser.add_argument("--sample-rate", type=float, default=0.1, help="A's head.sample_rate r (B has C*r classes)")
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per step (default 32)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per class count")
    parser.add_argument("--config", default="configs/quickstart.json", help="training config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"config overrides after the defaults {' '.join(DEFAULT_SET)}")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.sample_rate < 1:
        parser.error(f"--sample-rate {args.sample_rate}: give a rate in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SampledStepPlan(config=args.config, classes=args.classes, sample_rate=args.sample_rate, world=args.world,
                           batch=args.batch_size, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                           overrides=[*DEFAULT_SET, *args.set])
    with tempfile.TemporaryDirectory(prefix="sampled-step-") as work:
        try:
            result = bench_sampled_step(plan, Path(work), progress=lambda line: print(line, flush=True))
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
