"""Write the backbone of a largefr checkpoint as a plain PyTorch state_dict.

    python tools/export_backbone.py --checkpoint DIR --out model.pt [--prefix backbone.] [--precision fp32]

The weights come from DeepSpeed's module file (engine/mp_rank_00_model_states.pt, key 'module');
a leading 'module.' is stripped. The result loads with torch.load(path, weights_only=True) into
the backbone's load_state_dict.
"""
from __future__ import annotations

import argparse
import sys

import torch

from largefr.checkpoint.backbone import export_backbone
from largefr.checkpoint.save_load import locate_checkpoint
from largefr.cli import PRECISION_NAMES, add_option, run_tool

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "keep": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, its checkpoints/ folder or one step_<N> folder (latest complete step)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")
    parser.add_argument("--prefix", default="", help="keep only keys under this prefix and strip it (e.g. 'backbone.')")
    add_option(parser, "--precision", renamed_from=("--dtype",), old_values=PRECISION_NAMES, choices=sorted(DTYPES),
               default="fp32", help="cast floating tensors (default fp32; 'keep' = the training precision)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        weights = export_backbone(locate_checkpoint(args.checkpoint), args.out, prefix=args.prefix,
                                  dtype=DTYPES[args.precision])
        print(f"wrote {args.out}: {len(weights)} tensors, {sum(t.numel() for t in weights.values())} values")
        return 0

    return run_tool("export_backbone", body)


if __name__ == "__main__":
    sys.exit(main())
