"""Check, describe and rewrite RecordIO data sets (one .rec, a folder of shards, or a list of them).

    python tools/rec.py verify --rec DIR [--decode] [--workers N] [--classes C] [--json REPORT]
    python tools/rec.py stats --rec DIR [--sample N] [--json REPORT]
    python tools/rec.py shuffle --rec DIR --out DIR [--seed S] [--shard-images N | --shard-bytes 1G]
    python tools/rec.py merge --rec DIR --rec DIR2 ... --out DIR [--keep-labels] [--shard-images N | --shard-bytes 1G]

verify names every bad record (file, key, offset, problem): wrong magic, lengths or offsets past the
end of the file, payload headers, labels that are not integers or outside [0, classes) (classes: the
property file, or --classes), bytes that are not an image; --decode also decodes every image, in
--workers processes. Exit status 1 when anything is wrong. stats prints identities, images, images
per identity (histogram), and the formats and sizes of a sample of images. shuffle and merge read
any layout insightface's tools and im2rec write and write RecBuilder's (images from key 0), as one
train.rec or as shards (--shard-images / --shard-bytes), with property (and manifest.json for shards).
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import run_tool, write_json
from largefr.data.shard_writer import parse_size

_DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))


def _add_out_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new output folder")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--shard-images", type=int, default=None, help="write shards of this many images")
    limit.add_argument("--shard-bytes", type=parse_size, default=None, help="write shards of at most this size (1G)")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check every record; name each bad one")
    check.add_argument("--rec", required=True, nargs="+", help="a .rec, a folder (train.rec or shards), or several")
    check.add_argument("--classes", type=int, default=None, help="class count (default: the property file)")
    check.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    check.add_argument("--workers", type=int, default=_DEFAULT_WORKERS, help="decoding processes (--decode)")
    check.add_argument("--json", default=None, help="write the report here")
    check.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    describe = commands.add_parser("stats", help="identities, images, images per identity, image kinds")
    describe.add_argument("--rec", required=True, nargs="+", help="a .rec, a folder (train.rec or shards), or several")
    describe.add_argument("--sample", type=int, default=10000, help="records read for formats and sizes (0: all)")
    describe.add_argument("--workers", type=int, default=_DEFAULT_WORKERS, help="processes scanning files")
    describe.add_argument("--json", default=None, help="write the statistics here")
    mix = commands.add_parser("shuffle", help="rewrite in a seeded random order")
    mix.add_argument("--rec", required=True, nargs="+", help="a .rec, a folder (train.rec or shards), or several")
    mix.add_argument("--seed", type=int, default=0, help="seed of the order")
    _add_out_options(mix)
    join = commands.add_parser("merge", help="concatenate sets; labels of later sets follow earlier ones")
    join.add_argument("--rec", required=True, action="append", help="an input set (repeat the flag, in order)")
    join.add_argument("--keep-labels", action="store_true", help="keep labels as they are (one identity numbering)")
    _add_out_options(join)
    return parser


def _write_json(path: str | None, report: dict) -> None:
    if path:
        write_json(path, report)


def _verify(args: argparse.Namespace) -> int:
    from largefr.data.verify import verify

    report = verify(args.rec, num_classes=args.classes, decode=args.decode, workers=args.workers,
                    progress_every=args.progress_every)
    for finding in report.findings:
        print(finding)
    summary = report.as_dict()
    _write_json(args.json, summary)
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["problems"].items())
    print(f"verified {report.records:,} records in {report.files} files in {report.seconds:.1f} s: "
          f"{len(report.findings)} bad{f' ({kinds})' if kinds else ''}")
    return 1 if report.findings else 0


def _stats(args: argparse.Namespace) -> int:
    from largefr.data.verify import stats

    found = stats(args.rec, sample=args.sample, workers=args.workers)
    _write_json(args.json, found)
    per = found["images_per_identity"]
    print(f"{found['images']:,} images of {found['identities']:,} identities in {found['files']} files "
          f"({found['records_not_images']} records that are not images); property {found['property']}")
    print(f"images per identity: min {per['min']}, median {per['median']}, mean {per['mean']}, max {per['max']}")
    for span, count in per["histogram"].items():
        print(f"  {span:>11} images: {count:,} identities")
    print(f"formats of {found['sampled_images']:,} images: {found['formats']}; sizes: {found['sizes']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        if args.command == "verify":
            return _verify(args)
        if args.command == "stats":
            return _stats(args)
        from largefr.data.rewrite import merge, shuffle

        limits = dict(shard_images=args.shard_images, shard_bytes=args.shard_bytes, progress_every=args.progress_every)
        if args.command == "shuffle":
            written = shuffle(args.rec, args.out, seed=args.seed, **limits)
            print(f"wrote {written:,} images in a random order (seed {args.seed}) to {args.out}")
        else:
            written, classes = merge(args.rec, args.out, keep_labels=args.keep_labels, **limits)
            print(f"wrote {written:,} images of {classes:,} classes to {args.out}")
        return 0

    return run_tool("rec", body, error_status=1)


if __name__ == "__main__":
    sys.exit(main())
