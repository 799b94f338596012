"""Pack a folder of identity sub-folders into insightface RecordIO (train.rec, train.idx, property).

    python tools/pack_rec.py --images DIR --out DIR [--shuffle] [--seed N]

DIR/<identity>/<image>: one sub-folder per identity (labels follow sorted folder names), images in
any format PIL reads (jpg, png, bmp, webp, tiff); JPEGs are stored as they are, others re-encoded
as JPEG quality 95. All images must have one size (aligned faces, usually 112x112).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from largefr.data.pack import PackError, pack_image_folder  # noqa: E402
from largefr.data.recordio import RecordIOError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of identity sub-folders")
    parser.add_argument("--out", required=True, help="output folder for train.rec, train.idx, property")
    parser.add_argument("--shuffle", action="store_true",
                        help="store images in a seeded random order (no per-identity records)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    args = parser.parse_args(argv)
    try:
        num_images, num_classes = pack_image_folder(args.images, args.out, shuffle=args.shuffle, seed=args.seed)
    except (PackError, RecordIOError, OSError) as err:
        print(f"pack_rec: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {num_images} images of {num_classes} identities to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
