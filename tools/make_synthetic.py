"""Write a synthetic face-like identity data set in insightface's layout.

    python tools/make_synthetic.py --out DIR --identities N --images-per-identity K \
        [--image-size 112] [--pairs P] [--heldout-identities H] [--heldout-images-per-identity J] \
        [--seed S] [--workers W] [--overwrite]

DIR receives train.rec, train.idx, property (N classes, N x K images), synth_val.bin (P pairs,
half same-identity, of held-out identities not in the training set), synth_heldout/<identity>/<n>.jpg
(H x J labelled images of further identities, for clustering; none when H or J is 0) and synth_meta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from largefr.cli import add_option, run_tool
from largefr.data.synthetic import generate_dataset, validate_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--identities", type=int, required=True, help="training identities (classes)")
    parser.add_argument("--images-per-identity", type=int, required=True, help="images per training identity")
    add_option(parser, "--image-size", renamed_from=("--size",), type=int, default=112,
               help="image height and width in pixels (default 112)")
    parser.add_argument("--pairs", type=int, default=600, help="verification pairs, even (default 600)")
    parser.add_argument("--val-identities", type=int, default=None,
                        help="held-out identities the pairs are drawn from (default pairs // 4)")
    parser.add_argument("--heldout-identities", type=int, default=50,
                        help="identities of the labelled held-out folder synth_heldout/ (default 50; 0 = none)")
    parser.add_argument("--heldout-images-per-identity", type=int, default=10,
                        help="images per held-out identity (default 10; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="render processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)

    def body() -> int:
        validate_arguments(identities=args.identities, images_per_identity=args.images_per_identity,
                           pairs=args.pairs, image_size=args.image_size, seed=args.seed, workers=args.workers,
                           val_identities=args.val_identities, heldout_identities=args.heldout_identities,
                           heldout_images_per_identity=args.heldout_images_per_identity)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
        summary = generate_dataset(out, identities=args.identities, images_per_identity=args.images_per_identity,
                                   pairs=args.pairs, image_size=args.image_size, seed=args.seed, workers=args.workers,
                                   progress=not args.quiet, val_identities=args.val_identities,
                                   heldout_identities=args.heldout_identities,
                                   heldout_images_per_identity=args.heldout_images_per_identity,
                                   overwrite=args.overwrite)
        print(json.dumps(summary, indent=1))
        return 0

    return run_tool("make_synthetic", body)


if __name__ == "__main__":
    sys.exit(main())
