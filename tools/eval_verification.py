"""10-fold verification accuracy (flip test), best threshold and TAR at FAR 1e-3 on insightface .bin files.

    python tools/eval_verification.py --weights model.pt|--checkpoint DIR [--network r100] \
        --bins lfw.bin cfp_fp.bin agedb_30.bin [--batch-size 64] [--device cuda] [--json out.json]

Prints one table row per .bin (LFW, CFP-FP, CPLFW, AgeDB-30, CALFW, or any file in that format).
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import run_tool, write_json
from largefr.eval.pairs import evaluate_bin, format_table
from largefr.eval.weights import add_model_arguments, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--bins", nargs="+", required=True, help="verification .bin files")
    parser.add_argument("--far", type=float, default=1e-3, help="FAR of the reported TAR (default 1e-3)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        missing = [path for path in args.bins if not os.path.isfile(path)]
        if missing:  # before loading a large model
            raise FileNotFoundError(f"--bins: {', '.join(missing)}: no such verification file")
        loaded = load_backbone_from_args(args)
        print(f"model: {loaded.network}, embedding {loaded.embedding_size}, from {loaded.source}")
        results = [evaluate_bin(loaded.model, path, batch_size=args.batch_size, device=loaded.device,
                                far_target=args.far) for path in args.bins]
        print(format_table(results))
        if args.json:
            write_json(args.json, {"model": loaded.summary(), "results": [r.as_dict() for r in results]})
        return 0

    return run_tool("eval_verification", body)


if __name__ == "__main__":
    sys.exit(main())
