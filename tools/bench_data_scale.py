"""Data pipeline at scale: generate millions of tiny records, then time packing, the index scan (and its
peak memory), loader start-up and images/s, and verify (the table in docs/PERFORMANCE.md).

    python tools/bench_data_scale.py generate --out DIR [--identities 500000] [--images-per-identity 10]
                                     [--shard-images 500000] [--single-file] [--size 16]
    python tools/bench_data_scale.py images --out DIR --identities N [--images-per-identity 10] [--size 16]
    python tools/bench_data_scale.py pack --images DIR --out DIR [--workers 1 2] [--rounds 3] [--json REPORT]
    python tools/bench_data_scale.py scan --rec DIR [--shards-per-step 2] [--workers 1] [--json REPORT]
    python tools/bench_data_scale.py loader --rec DIR [--batches 100] [--batch-size 256] [--workers 2] [--json REPORT]
    python tools/bench_data_scale.py verify --rec DIR [--decode --workers 2] [--json REPORT]

generate writes records directly (RecBuilder layout, keys global, identities in order, one small
JPEG per identity reused by all its images, so writing is I/O-bound): shards of --shard-images, or
one train.rec. images writes an image folder of hard links (one JPEG per identity) for `pack`,
which runs tools/pack_rec.py once per --workers value and round into OUT/w<N> (rounds alternate the
worker counts; medians of images/s and of the per-round ratios) and checks every output is
byte-identical. scan runs the index scan in a fresh process over the first k shards for growing k
(a fresh cache each time), reporting seconds, peak resident memory of the scanning process and of
its workers, and the memory beyond the kept arrays (per million records); then the cached reload.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time

from largefr.cli import write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DISTINCT_JPEGS = 4096
"""Distinct tiny JPEGs, identity i uses number i % 4096 (encoding 500k of them would dominate)."""


def _jpegs(size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(_DISTINCT_JPEGS):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def generate(args: argparse.Namespace) -> dict:
    from largefr.data.recordio import encode_record, pack_header
    from largefr.data.shard_writer import ShardWriter, write_manifest, write_property

    started = time.monotonic()
    jpegs = _jpegs(args.size)
    writer = ShardWriter(args.out, shard_images=None if args.single_file else args.shard_images,
                         single_file=args.single_file)
    for identity in range(args.identities):
        image = jpegs[identity % _DISTINCT_JPEGS]
        for _ in range(args.images_per_identity):
            framed = encode_record(pack_header(float(identity), image, id=writer.next_key))
            if writer.full(len(framed)):
                writer.close()
            writer.add_framed(framed, identity)
        if identity % 50000 == 0:
            print(f"generated {writer.next_key:,} records", file=sys.stderr, flush=True)
    writer.close()
    write_property(args.out, args.identities, (args.size, args.size), writer.next_key)
    if not args.single_file:
        write_manifest(args.out, {"settings": {"shard_images": args.shard_images}, "generated": True,
                                  "images": writer.next_key, "complete": True, "shards": writer.shards})
    return {"records": writer.next_key, "files": len(writer.shards), "seconds": time.monotonic() - started,
            "bytes": sum(s["rec_bytes"] for s in writer.shards)}


def images(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    jpegs = _jpegs(args.size)
    for identity in range(args.identities):
        folder = os.path.join(args.out, f"id{identity:07d}")
        os.makedirs(folder)
        first = os.path.join(folder, "0000.jpg")
        with open(first, "wb") as f:
            f.write(jpegs[identity % _DISTINCT_JPEGS])
        for number in range(1, args.images_per_identity):
            os.link(first, os.path.join(folder, f"{number:04d}.jpg"))
    return {"files": args.identities * args.images_per_identity, "seconds": time.monotonic() - started}


def _digest(folder: str) -> str:
    digest = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        if name.startswith("train-") and name.endswith((".rec", ".idx")) or name in ("property", "manifest.json"):
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _pack_once(args: argparse.Namespace, workers: int, out: str) -> dict:
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "pack_rec.py"), "--images", args.images,
               "--out", out, "--workers", str(workers), "--shard-images", str(args.shard_images),
               "--progress-every", "30"]
    started = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - started
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        count = json.load(f)["images"]
    print(f"pack --workers {workers}: {count:,} images in {seconds:.1f} s ({count / seconds:,.0f} images/s)",
          file=sys.stderr, flush=True)
    return {"workers": workers, "images": count, "seconds": seconds, "images_per_s": count / seconds,
            "digest": _digest(out)}


def pack(args: argparse.Namespace) -> dict:
    """Each round packs once per --workers value, back to back (ratios stay fair on a drifting machine)."""
    import shutil
    import statistics

    runs = []
    for _ in range(args.rounds):
        for workers in args.workers:
            out = os.path.join(args.out, f"w{workers}")
            shutil.rmtree(out, ignore_errors=True)
            runs.append(_pack_once(args, workers, out))
    first = args.workers[0]
    summary = {}
    for workers in args.workers:
        rates = [r["images_per_s"] for r in runs if r["workers"] == workers]
        ratios = [b["images_per_s"] / a["images_per_s"] for a, b in
                  zip([r for r in runs if r["workers"] == first], [r for r in runs if r["workers"] == workers])]
        summary[str(workers)] = {"median_images_per_s": statistics.median(rates),
                                 f"median_ratio_to_{first}_workers": statistics.median(ratios)}
    return {"runs": runs, "summary": summary, "identical": len({r["digest"] for r in runs}) == 1}


_SCAN_CHILD = r"""
import json, os, resource, sys, time
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
import numpy as np
from largefr.data.image_index import prepare_image_index
rec, cache, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
base = rss("VmRSS:")
started = time.monotonic()
index = prepare_image_index(rec, cache_dir=cache, workers=workers, progress_every=30)
seconds = time.monotonic() - started
kept = index.keys.nbytes + index.offsets.nbytes + index.labels.nbytes
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"records": len(index), "seconds": seconds, "base_rss": base, "peak_rss": rss("VmHWM:"),
                  "kept_bytes": kept, "worker_peak_rss": children}))
"""


def _scan_once(rec: list[str], cache: str, workers: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _SCAN_CHILD, json.dumps(rec), cache, str(workers)],
                            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    found = json.loads(result.stdout.strip().splitlines()[-1])
    beyond = found["peak_rss"] - found["base_rss"] - found["kept_bytes"]
    found["beyond_kept_mb_per_million"] = beyond / 1e6 / (found["records"] / 1e6)
    return found


def scan(args: argparse.Namespace) -> dict:
    from largefr.data.rec_set import resolve_rec_set

    files = [f.rec for f in resolve_rec_set(args.rec).files]
    steps = sorted({min(k, len(files)) for k in range(args.shards_per_step, len(files) + args.shards_per_step,
                                                       args.shards_per_step)})
    runs = []
    for count in steps:
        with tempfile.TemporaryDirectory(dir=args.cache_root) as cache:
            cold = _scan_once(files[:count], cache, args.workers)
            warm = _scan_once(files[:count], cache, args.workers)
        runs.append({"files": count, "cold": cold, "cached": warm})
        print(f"scan of {cold['records']:,} records in {count} files: {cold['seconds']:.1f} s, peak "
              f"{cold['peak_rss'] / 1e6:.0f} MB (kept arrays {cold['kept_bytes'] / 1e6:.0f} MB, beyond them "
              f"{cold['beyond_kept_mb_per_million']:.1f} MB per million records); cached: {warm['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    return {"workers": args.workers, "runs": runs}


def loader(args: argparse.Namespace) -> dict:
    from largefr.data import build_loader
    from largefr.data.rec_set import resolve_rec_set

    classes, size = resolve_rec_set(args.rec).property()[:2]
    out = {}
    for kind in args.loaders:
        started = time.monotonic()
        loaded = build_loader(kind, rec=args.rec, batch_size=args.batch_size, rank=0, world_size=1,
                              num_classes=classes, image_size=size, num_workers=args.workers, device="cpu",
                              cache_dir=args.cache_dir)
        batches = iter(loaded)
        next(batches)
        startup = time.monotonic() - started
        started = time.monotonic()
        for _ in range(args.batches):
            next(batches)
        seconds = time.monotonic() - started
        out[kind] = {"startup_s": startup, "images_per_s": args.batches * args.batch_size / seconds,
                     "batches": args.batches, "batch_size": args.batch_size, "records": len(loaded.index)}
        print(f"{kind}: start-up (index scan or its cache, loader, first batch) {startup:.1f} s, "
              f"{out[kind]['images_per_s']:,.0f} images/s", file=sys.stderr, flush=True)
        del batches, loaded
    return out


def verify_timing(args: argparse.Namespace) -> dict:
    from largefr.data.verify import verify

    report = verify(args.rec, decode=args.decode, workers=args.workers, progress_every=30)
    return {"records": report.records, "files": report.files, "seconds": report.seconds, "decode": args.decode,
            "workers": args.workers, "bad": len(report.findings)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate")
    gen.add_argument("--out", required=True)
    gen.add_argument("--identities", type=int, default=500000)
    gen.add_argument("--images-per-identity", type=int, default=10)
    gen.add_argument("--shard-images", type=int, default=500000)
    gen.add_argument("--single-file", action="store_true")
    gen.add_argument("--size", type=int, default=16, help="image side in pixels")
    tree = commands.add_parser("images")
    tree.add_argument("--out", required=True)
    tree.add_argument("--identities", type=int, required=True)
    tree.add_argument("--images-per-identity", type=int, default=10)
    tree.add_argument("--size", type=int, default=16)
    packing = commands.add_parser("pack")
    packing.add_argument("--images", required=True)
    packing.add_argument("--out", required=True)
    packing.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    packing.add_argument("--shard-images", type=int, default=100000)
    packing.add_argument("--rounds", type=int, default=1, help="packs per --workers value, alternating")
    scanning = commands.add_parser("scan")
    scanning.add_argument("--rec", required=True)
    scanning.add_argument("--shards-per-step", type=int, default=2)
    scanning.add_argument("--workers", type=int, default=1)
    scanning.add_argument("--cache-root", default=None, help="where the fresh caches go (default: the system's)")
    loading = commands.add_parser("loader")
    loading.add_argument("--rec", required=True)
    loading.add_argument("--loaders", nargs="+", default=["torch", "dali"])
    loading.add_argument("--batches", type=int, default=100)
    loading.add_argument("--batch-size", type=int, default=256)
    loading.add_argument("--workers", type=int, default=2, help="torch DataLoader workers or DALI threads")
    loading.add_argument("--cache-dir", default=None)
    checking = commands.add_parser("verify")
    checking.add_argument("--rec", required=True)
    checking.add_argument("--decode", action="store_true")
    checking.add_argument("--workers", type=int, default=2)
    for sub in (gen, tree, packing, scanning, loading, checking):
        sub.add_argument("--json", default=None, help="write the measurements here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {"generate": generate, "images": images, "pack": pack, "scan": scan, "loader": loader,
           "verify": verify_timing}[args.command]
    result = {"command": " ".join(sys.argv), **run(args)}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
