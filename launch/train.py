"""Train: `python launch/train.py --config CFG [--world N]`, `deepspeed launch/train.py ...` or `torchrun ... launch/train.py ...`."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON or YAML config file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. head.margin=0.4")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint) or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run in the output folder first (without it, or --resume, a folder "
                             "holding a run is refused)")
    parser.add_argument("--world", type=int, default=None, metavar="N",
                        help="ranks to start on this machine (through DeepSpeed's launcher, on a free rendezvous "
                             "port); default: one process, or the ranks a launcher (deepspeed, torchrun) started")
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party lines filtered by default (DeepSpeed's no-GPU warning, its "
                             "launcher's INFO lines, the comm-op build line of every rank; LARGEFR_VERBOSE=1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    if args.world is not None and args.world < 1:
        parser.error(f"--world {args.world}: give 1 or more ranks")
    return args


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash in C++ code (SIGSEGV, SIGABRT) still prints each thread's Python stack
    args = parse_args(argv)
    if args.verbose:
        os.environ["LARGEFR_VERBOSE"] = "1"  # the ranks inherit it
    from largefr.train.huge_pages import use_huge_pages  # (importing largefr reads LARGEFR_VERBOSE)

    use_huge_pages()  # before torch loads; the ranks inherit it
    launched = os.environ.get("WORLD_SIZE")
    if args.world is not None and launched is None and args.world > 1:
        from largefr.train.local_launch import launch_local_ranks

        return launch_local_ranks(args.world, sys.argv[1:] if argv is None else argv)
    if args.world is not None and launched is not None and args.world != int(launched):
        print(f"error: --world {args.world}, but the launcher started {launched} rank(s): leave --world out under "
              "a launcher, or start without one", file=sys.stderr)
        return 2
    from largefr.train.run import run_training

    return run_training(args.config, args.set, resume=args.resume, overwrite=args.overwrite,
                        world_size=int(launched or "1"))


def exit_now(code: int) -> None:
    """Exit without interpreter finalization once the run's files are closed and the process group is gone.

    On torch 2.13 + gloo a finished rank now and then aborts (SIGABRT, "terminate called without an
    active exception", no Python frame) while the interpreter tears down: C++ threads outlive Python
    (cf. pytorch PR 179291). The launcher would report a run that completed as failed; skipping the
    finalization avoids that. Logs and output files are already flushed and closed by then.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
