"""Pack a folder of identity sub-folders into insightface RecordIO shards, in parallel and resumably.

    python tools/pack_rec.py --images DIR --out DIR [--workers N] [--shard-bytes 1G | --shard-images N]
                             [--skip-bad] [--progress-every S]
    python tools/pack_rec.py --images DIR --out DIR --single-file [--shuffle] [--seed N]

DIR/<identity>/<image>: one sub-folder per identity (labels follow sorted folder names), images in
any format PIL reads (jpg, png, bmp, webp, tiff); JPEGs are stored as they are, others re-encoded
as JPEG quality 95. All images must have one size (aligned faces, usually 112x112).

Default output: shards train-00000.rec/.idx, ... of at most --shard-bytes (default 1G) or
--shard-images images, one `property` and one `manifest.json`; data.rec reads the folder. Stopped
(Ctrl-C, a crash), the same command resumes: finished shards whose files are unchanged are kept.
The bytes written depend only on the input and the shard settings, not on --workers.
--single-file writes one train.rec in insightface's layout (header and identity records), with
--shuffle in a seeded random order; one process.
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import run_tool
from largefr.data.pack import pack_image_folder
from largefr.data.pack_shards import DEFAULT_SHARD_BYTES, PackSettings, pack_shards
from largefr.data.shard_writer import parse_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of identity sub-folders")
    parser.add_argument("--out", required=True, help="output folder (shards, property, manifest.json)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="worker processes reading and checking images (default: one per core, at most 8)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--shard-bytes", type=parse_size, default=None,
                       help=f"largest shard .rec, e.g. 512M or 1G (default {DEFAULT_SHARD_BYTES >> 30}G)")
    limit.add_argument("--shard-images", type=int, default=None, help="images per shard")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images (named on stderr, counted, listed in manifest.json) "
                             "instead of stopping at the first one")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--single-file", action="store_true",
                        help="one train.rec in insightface's layout (one process)")
    parser.add_argument("--shuffle", action="store_true",
                        help="with --single-file: store images in a seeded random order (no identity records)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shuffle and not args.single_file:
        parser.error("--shuffle needs --single-file (tools/rec.py shuffle shuffles a shard set)")
    if args.shard_images is not None and args.shard_images < 1:
        parser.error("--shard-images must be >= 1")

    def body() -> int:
        if args.single_file:
            num_images, num_classes = pack_image_folder(args.images, args.out, shuffle=args.shuffle, seed=args.seed)
            print(f"wrote {num_images} images of {num_classes} identities to {args.out}")
            return 0
        settings = PackSettings(shard_images=args.shard_images,
                                shard_bytes=None if args.shard_images else (args.shard_bytes or DEFAULT_SHARD_BYTES),
                                on_bad_image="skip" if args.skip_bad else "error")
        result = pack_shards(args.images, args.out, settings=settings, workers=args.workers,
                             progress=sys.stderr, progress_every=args.progress_every)
        reused = f", {result.reused_shards} shards kept from an earlier run" if result.reused_shards else ""
        print(f"wrote {result.num_images} images of {result.num_classes} identities in {result.num_shards} shards "
              f"to {args.out} ({result.skipped} unreadable files skipped{reused})")
        return 0

    try:
        return run_tool("pack_rec", body, error_status=1)
    except KeyboardInterrupt:
        print(f"pack_rec: stopped; run the same command again to resume ({args.out}/manifest.json lists the "
              "finished shards)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
