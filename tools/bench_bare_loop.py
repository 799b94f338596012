"""The trainer's ArcFace step against a bare torch DDP loop of the same parts, alternating in one run.

    python tools/bench_bare_loop.py --world 2 --batch-size 8 --image-size 112 --classes 10000 \\
        --embedding-size 512 --sample-rate 1.0 --steps 10 --repeats 5 --json runs/bare_loop.json

Spawns `--world` gloo ranks (1 torch thread each). Trainer side: `build_trainer` from the config (the
real DeepSpeed engine, sharded head, row-sparse head optimizer, StepRunner and loop) on the synthetic
in-memory loader. Bare side: the same backbone under torch DistributedDataParallel (default buckets), the
same sharded head and optimizers, no DeepSpeed, no cluster terms (`largefr.perf.bare_loop`). Prints
images/s of each, their ratio (the trainer's overhead: 1.0 is none), the losses of both on steps 1 and 2
(like for like), the layout of both sides and a phase table of where the trainer's extra time goes.
The config (default configs/quickstart.json) is overridden with `largefr.perf.bare_loop.BENCH_OVERRIDES`
(ArcFace only, IResNet-18, SGD momentum 0.9, clipping 5), then the flags below, then `--set`.
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import write_json
from largefr.choices import PRECISIONS
from largefr.perf.bare_loop import BENCH_OVERRIDES, BareLoopPlan, bench_bare_loop, format_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "quickstart.json"),
                        help="training config the trainer side is built from (default configs/quickstart.json)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (applied last)")
    parser.add_argument("--world", type=int, default=2, help="number of gloo ranks to spawn")
    parser.add_argument("--batch-size", type=int, default=8, help="images per rank per step (train.batch_size)")
    parser.add_argument("--image-size", type=int, default=112, help="input size in pixels (data.image_size)")
    parser.add_argument("--classes", type=int, default=10000, help="number of classes (data.num_classes)")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding size (model.embedding_size)")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate (head.sample_rate)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="train.precision (the bare loop runs fp32 only)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (both sides start from its weights)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each side per round")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each side first")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps of each side for the phase table (0: none)")
    parser.add_argument("--variant", nargs="+", default=None, metavar="KEY=VALUE",
                        help="also time a second trainer with these config overrides in the same rounds (an A/B of "
                             "a trainer setting, e.g. train.overlap_reduction=false)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.profile_steps < 0 or args.world < 1:
        parser.error("--steps, --repeats and --world must be >= 1, --warmup and --profile-steps >= 0")
    return args


def overrides(args: argparse.Namespace) -> list[str]:
    """BENCH_OVERRIDES, then the flags, then --set (the last one of a key wins)."""
    images = max(args.batch_size * args.world * 1000, 1)  # a long synthetic epoch: no epoch ends in a round
    flags = [f"train.batch_size={args.batch_size}", f"data.image_size={args.image_size}",
             f"data.num_classes={args.classes}", f"data.num_images={images}",
             f"model.embedding_size={args.embedding_size}", f"head.sample_rate={args.sample_rate}",
             f"train.precision={args.precision}", f"train.seed={args.seed}", f"train.world={args.world}"]
    return [*BENCH_OVERRIDES, *flags, *args.set]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from largefr.config import load_config

    config = load_config(args.config, overrides(args), world_size=args.world)
    plan = BareLoopPlan(steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                        profile_steps=args.profile_steps)
    print(f"bench_bare_loop: {args.world} ranks, {args.repeats} rounds x {args.steps} steps per side "
          f"(+{args.warmup} warm-up, {args.profile_steps} profiled)", flush=True)
    variant_config = None
    if args.variant:
        variant_config = load_config(args.config, [*overrides(args), *args.variant], world_size=args.world)
    report = bench_bare_loop(config, args.world, plan, variant_config=variant_config, variant=args.variant)
    print(format_report(report), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
