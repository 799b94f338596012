"""Export a backbone to ONNX and check onnxruntime against torch.

    python tools/export_onnx.py --weights model.pt|--checkpoint DIR [--network r100] --out model.onnx \
        [--opset 17] [--bins synth_val.bin ...] [--tolerance 1e-4]

The ONNX model: input `data`, float32 N x 3 x 112 x 112 (N dynamic), RGB, (pixel - 127.5) / 127.5;
output `embedding`, N x d raw embeddings (L2-normalize before comparing). After export the tool
runs onnxruntime and torch on random images (and on the first images of each of --bins) and fails
when the largest absolute difference of the L2-normalized embeddings exceeds --tolerance (the raw
difference is printed too: it grows with the embeddings' norm and is not judged).
"""
from __future__ import annotations

import argparse
import sys

import torch

from largefr.data.verification_bin import decode_pairs, load_bin
from largefr.cli import add_option, run_tool
from largefr.eval.image_size import announce_bin_resize, image_size_of
from largefr.eval.onnx_export import (DEFAULT_OPSET, NORMALIZATION, export_onnx, max_abs_difference,
                                      normalized_difference)
from largefr.eval.weights import add_model_arguments, load_backbone_from_args

CHECK_IMAGES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    add_option(parser, "--bins", renamed_from=("--check-bin",), nargs="+", default=[],
               help="also compare on the first images of each of these .bin files")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |onnx - torch| of L2-normalized embeddings allowed (default 1e-4)")
    return parser.parse_args(argv)


def check_sets(bins: list[str], image_size: int = 112) -> dict[str, torch.Tensor]:
    """Named N x 3 x S x S normalized batches to compare on (batch sizes other than the export's 1)."""
    generator = torch.Generator().manual_seed(0)
    sets = {"random": torch.rand(CHECK_IMAGES, 3, image_size, image_size, generator=generator) * 2 - 1}
    for path in bins:
        images, _ = load_bin(path)
        announce_bin_resize(path, images[:CHECK_IMAGES], image_size)
        sets[path] = decode_pairs(images[:CHECK_IMAGES], image_size, source=path)
    return sets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        for path in args.bins:
            load_bin(path)  # a bad .bin fails before the export
        args.device = "cpu"
        loaded = load_backbone_from_args(args)
        size = image_size_of(loaded.model)
        sets = check_sets(args.bins, size)
        export_onnx(loaded.model, args.out, image_size=size, opset=args.opset,
                    metadata={"network": loaded.network, "embedding_size": loaded.embedding_size,
                              "source": loaded.source})
        print(f"{args.out}: {loaded.network}, input 'data' Nx3x{size}x{size} RGB {NORMALIZATION}, "
              f"output 'embedding' Nx{loaded.embedding_size}, opset {args.opset}")
        worst = 0.0
        for name, images in sets.items():
            difference = normalized_difference(loaded.model, args.out, images)
            raw = max_abs_difference(loaded.model, args.out, images)
            worst = max(worst, difference)
            print(f"onnxruntime vs torch on {images.shape[0]} images ({name}): max |diff| = {difference:.2e} "
                  f"(L2-normalized embeddings; raw {raw:.2e})")
        if worst > args.tolerance:
            print(f"export_onnx: error: max |diff| {worst:.2e} of the L2-normalized embeddings exceeds --tolerance "
                  f"{args.tolerance:g}", file=sys.stderr)
            return 1
        return 0

    return run_tool("export_onnx", body)


if __name__ == "__main__":
    sys.exit(main())
