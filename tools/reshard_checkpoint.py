"""Re-split a largefr checkpoint for another number of ranks, offline.

    python tools/reshard_checkpoint.py --checkpoint DIR --world N --out NEW_DIR

Head shards (classifier, bank, phi and their optimizer rows) are re-split by class range for N
ranks, streamed: each old head file is read once, its sha256 checked on the way, and its rows
written into the new files one block at a time (`largefr.checkpoint.rows.ROW_BLOCK_BYTES`), so
the tool's memory does not grow with the checkpoint. Per-rank extras (RNG states) are dropped.
The replicated state is checked and copied. DeepSpeed's engine files are copied when they load on
N ranks (ZeRO 0, or the same world size); ZeRO-1/2 optimizer partitions of another world size are
converted to DeepSpeed's universal checkpoint format, which the trainer restores on any number of
ranks. Resume with `checkpoint.resume=NEW_DIR`.
"""
from __future__ import annotations

import argparse
import sys

from largefr.checkpoint.reshard import reshard_checkpoint
from largefr.checkpoint.save_load import locate_checkpoint
from largefr.cli import run_tool
from largefr.errors import UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, its checkpoints/ folder or one step_<N> folder (latest complete step)")
    parser.add_argument("--world", type=int, required=True, help="number of ranks that will resume it")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.world < 1:
            raise UsageError(f"--world must be >= 1, got {args.world}")
        out = reshard_checkpoint(locate_checkpoint(args.checkpoint), args.out, args.world,
                                 log=lambda line: print(line, flush=True))
        print(f"wrote {out} for {args.world} ranks")
        return 0

    return run_tool("reshard_checkpoint", body)


if __name__ == "__main__":
    sys.exit(main())
