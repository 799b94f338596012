"""Train: `deepspeed launch/train.py --config CFG`, `torchrun ... launch/train.py --config CFG` or plain python."""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON or YAML config file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. head.margin=0.4")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint) or a checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash in C++ code (SIGSEGV, SIGABRT) still prints each thread's Python stack
    args = parse_args(argv)
    from largefr.train.run import run_training

    return run_training(args.config, args.set, resume=args.resume, world_size=int(os.environ.get("WORLD_SIZE", "1")))


if __name__ == "__main__":
    sys.exit(main())
