"""Embed a folder of aligned face crops into an .npy matrix (one row per image).

    python tools/embed.py --weights model.pt|--checkpoint DIR [--network r100] --images DIR --out emb.npy \
        [--batch-size 64] [--device cuda] [--flip] [--no-normalize] [--resize] [--labels-out y.npy]

The crops must be square and at the model's input size (112 px for insightface's models; the weights say
it); crops of another size are refused naming both sizes, and --resize resizes them (bilinear).

Rows follow the sorted relative image paths, written next to the matrix as <out>.txt. With
--labels-out and images in per-identity subfolders (DIR/<identity>/*.jpg), the identity index of
each row is saved too (input for tools/eval_clustering.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from largefr.cli import run_tool
from largefr.errors import UsageError
from largefr.eval.embed import embed_folder
from largefr.eval.image_size import RESIZE_FLAG, image_size_of
from largefr.eval.weights import add_model_arguments, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of aligned square face crops at the model's input "
                                                        "size (searched recursively)")
    parser.add_argument(RESIZE_FLAG, action="store_true",
                        help="resize crops of another size to the model's input size (default: refuse them)")
    parser.add_argument("--out", required=True, help="output .npy (N x d float32)")
    parser.add_argument("--flip", action="store_true", help="embedding of image + mirror image (flip test)")
    parser.add_argument("--no-normalize", action="store_true", help="keep raw embeddings (default: L2-normalized)")
    parser.add_argument("--labels-out", default=None, help="write per-row identity indices (.npy) from subfolders")
    return parser.parse_args(argv)


def names_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npy") else out) + ".txt"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if not args.out.endswith(".npy"):
            raise UsageError(f"--out {args.out}: use a .npy file name")
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"--images {args.images}: no such directory")
        loaded = load_backbone_from_args(args)
        result = embed_folder(loaded.model, args.images, batch_size=args.batch_size, device=loaded.device,
                              flip=args.flip, normalize=not args.no_normalize,
                              image_size=image_size_of(loaded.model), resize=args.resize)
        if args.labels_out and result.labels is None:
            raise UsageError(f"--labels-out: some images are directly in {args.images}, not in identity subfolders")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.save(args.out, result.embeddings)
        with open(names_path(args.out), "w", encoding="utf-8") as handle:
            handle.write("\n".join(result.names) + "\n")
        print(f"{args.out}: {result.embeddings.shape[0]} x {result.embeddings.shape[1]} float32 "
              f"({loaded.network}, {'flip-sum, ' if args.flip else ''}"
              f"{'raw' if args.no_normalize else 'L2-normalized'}); row names in {names_path(args.out)}")
        if args.labels_out:
            np.save(args.labels_out, result.labels)
            print(f"{args.labels_out}: {len(result.identities)} identities (subfolders)")
        return 0

    return run_tool("embed", body)


if __name__ == "__main__":
    sys.exit(main())
