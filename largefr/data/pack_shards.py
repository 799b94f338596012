"""Pack a folder of identity sub-folders into shards with N worker processes; stop and resume at will.

Order and labels: identity folders in sorted name order (label = position), images in sorted name
order inside each; the file list is streamed folder by folder (only the folder names are held).
Workers read and check images (largefr/data/pack.py encode_for_rec) in bounded windows; the main
process frames them in input order, so the output is byte-identical for the same input and shard
settings whatever the number of workers. A shard closes when the next image would pass the limit
(`shard_images` images or `shard_bytes` bytes); after each, `manifest.json` records it with the range
of input files it holds and a digest of their (label, name, size, mtime): a resumed run keeps every
shard whose files are unchanged and packs from the first one that is not. An unreadable file (or
one of another size) stops the pack naming it (on_bad_image='error') or is skipped, named on stderr,
counted and listed in the manifest ('skip').
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from largefr.data.pack import IMAGE_EXTENSIONS, PackError, encode_for_rec
from largefr.data.rec_set import SHARD_PATTERN
from largefr.data.recordio import encode_record, pack_header
from largefr.data.shard_writer import (MANIFEST_VERSION, ShardWriter, read_manifest, write_manifest,
                                       write_property)

BAD_FILE_POLICIES = ("error", "skip")
DEFAULT_SHARD_BYTES = 1 << 30
"""Shard size when neither a count nor a size is given: 1 GiB (a few hundred thousand 112 px faces)."""
_CHUNK = 128
"""Images per task sent to a worker."""


@dataclass(frozen=True)
class PackSettings:
    """What decides the bytes of a pack besides its input."""

    shard_images: int | None = None
    shard_bytes: int | None = None
    on_bad_image: str = "error"

    def as_dict(self) -> dict:
        return {"version": MANIFEST_VERSION, "shard_images": self.shard_images, "shard_bytes": self.shard_bytes,
                "on_bad_image": self.on_bad_image}


@dataclass
class PackResult:
    num_images: int
    num_classes: int
    num_shards: int
    skipped: int
    reused_shards: int


def identity_folders(images_dir: str) -> list[str]:
    """Identity folder names in sorted order (label = position); an error when there are none."""
    if not os.path.isdir(images_dir):
        raise PackError(f"{images_dir}: not a folder")
    names = sorted(e.name for e in os.scandir(images_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise PackError(f"{images_dir}: holds no identity sub-folders (expected one folder of images per identity)")
    return names


def iter_files(images_dir: str, folders: list[str]) -> Iterator[tuple[int, str]]:
    """(label, path) of every image, folder by folder (streamed); the label is the identity's number."""
    for label, name in enumerate(folders):
        folder = os.path.join(images_dir, name)
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise PackError(f"{folder}: identity folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for file_name in files:
            yield label, os.path.join(folder, file_name)


def _source_line(label: int, path: str, images_dir: str, stat: tuple[int, int]) -> bytes:
    """What the digest of a shard's input records of one file: label, name, size, mtime."""
    return f"{label}\0{os.path.relpath(path, images_dir)}\0{stat[0]}\0{stat[1]}\n".encode()


def _stat(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


Encoded = tuple[bytes | None, tuple[int, int] | None, str | None, tuple[int, int]]
"""(image bytes, (H, W), None, (size, mtime)) or (None, None, problem, (size, mtime)) of one file."""


def _encode_chunk(paths: list[str]) -> list[Encoded]:
    """Read and check each image (runs in a worker)."""
    out = []
    for path in paths:
        stat = _stat(path)
        try:
            data, size = encode_for_rec(path)
            out.append((data, size, None, stat))
        except (PackError, OSError) as err:
            out.append((None, None, str(err), stat))
    return out


def _encoded(files: Iterator[tuple[int, str]], workers: int) -> Iterator[tuple[tuple[int, str], Encoded]]:
    """(file, encode result) in input order; at most 4 chunks per worker in flight (bounded memory)."""
    def chunks() -> Iterator[list[tuple[int, str]]]:
        chunk = []
        for item in files:
            chunk.append(item)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    if workers <= 1:
        for chunk in chunks():
            yield from zip(chunk, _encode_chunk([path for _, path in chunk]))
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch's threads
    with context.Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        source = chunks()
        for chunk in source:
            pending.append((chunk, pool.apply_async(_encode_chunk, ([path for _, path in chunk],))))
            if len(pending) >= 4 * workers:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


class _Progress:
    """A line every `every` seconds: images, identities, images/s, ETA (from the identities done)."""

    def __init__(self, out: TextIO | None, every: float, identities: int) -> None:
        self.out, self.every, self.identities = out, every, identities
        self.started = self.shown = time.monotonic()
        self.images = 0

    def update(self, images: int, identity: int, shard: int, skipped: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.out is None or (not final and now - self.shown < self.every):
            return
        self.shown = now
        rate = (images - self.images) / max(now - self.started, 1e-9)
        done = (identity + 1) / self.identities
        eta = (now - self.started) * (1 - done) / max(done, 1e-9)
        print(f"packed {images:,} images ({skipped} skipped), identity {identity + 1:,}/{self.identities:,} "
              f"({100 * done:.1f}%), {shard} shards done, {rate:,.0f} images/s, ETA {_duration(eta)}",
              file=self.out, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# resume


def _reusable(manifest: dict | None, settings: PackSettings, images_dir: str, out_dir: str,
              files: Iterator[tuple[int, str]]) -> tuple[list[dict], Iterator[tuple[int, str]]]:
    """(finished shards whose input is unchanged, the files left to pack)."""
    if manifest is None:
        return [], files
    if manifest.get("settings") != settings.as_dict():
        raise PackError(f"{out_dir}: was packed with {manifest.get('settings')}, not {settings.as_dict()}; "
                        "pack into another folder (--out) or delete this one")
    kept: list[dict] = []
    for shard in manifest["shards"]:
        start, end = shard["files"]
        taken = [item for _, item in zip(range(end - start), files)]
        digest = hashlib.sha1()
        for label, path in taken:
            digest.update(_source_line(label, path, images_dir, _stat(path)))
        if len(taken) != end - start or digest.hexdigest() != shard["source_digest"]:
            return kept, _chain(taken, files)
        kept.append(shard)
    if manifest.get("complete") and kept:  # new files after a complete pack: its last shard is packed again
        following = next(files, None)
        if following is None:
            return kept, iter(())
        last = kept.pop()
        return kept, _chain([following], files, redo=(images_dir, last))
    return kept, files


def _chain(first: list, rest: Iterator, redo: tuple[str, dict] | None = None) -> Iterator:
    if redo is not None:  # the files of the dropped last shard come first again
        images_dir, shard = redo
        folders = identity_folders(images_dir)
        again = iter_files(images_dir, folders)
        for _ in range(shard["files"][0]):
            next(again)
        yield from (item for _, item in zip(range(shard["files"][1] - shard["files"][0]), again))
    yield from first
    yield from rest


def _remove_unlisted(out_dir: str, keep: set[str]) -> None:
    """Shards (and temporary files) of an earlier run that the manifest does not keep."""
    for name in os.listdir(out_dir):
        stem = name.split(".", 1)[0]
        is_shard = SHARD_PATTERN.match(stem + ".rec") is not None and name.endswith((".rec", ".idx", ".tmp"))
        if is_shard and stem not in keep:
            os.remove(os.path.join(out_dir, name))


# ---------------------------------------------------------------------------------------------
# packing


@dataclass
class _OpenShard:
    first_file: int
    digest: "hashlib._Hash"
    skipped: list[str]


def pack_shards(images_dir: str, out_dir: str, *, settings: PackSettings = PackSettings(shard_bytes=DEFAULT_SHARD_BYTES),
                workers: int = 1, progress: TextIO | None = sys.stderr, progress_every: float = 10.0,
                on_shard=None) -> PackResult:
    """Pack `images_dir/<identity>/<image>` into shards in `out_dir`, resuming a stopped pack there.

    `on_shard(entry)` is called after each shard is recorded in the manifest.
    """
    if settings.on_bad_image not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_FILE_POLICIES}, got {settings.on_bad_image!r}")
    folders = identity_folders(images_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "train.rec")):
        raise PackError(f"{out_dir}: holds train.rec (a single-file data set); pack shards into another folder")
    manifest = read_manifest(out_dir)
    kept, files = _reusable(manifest, settings, images_dir, out_dir, iter_files(images_dir, folders))
    _remove_unlisted(out_dir, {shard["name"] for shard in kept})
    if manifest is not None and manifest.get("complete") and len(kept) == len(manifest["shards"]):
        return PackResult(manifest["images"], len(folders), len(kept), manifest["skipped"], len(kept))
    image_size = tuple(manifest["image_size"]) if kept else None
    writer = ShardWriter(out_dir, shard_images=settings.shard_images, shard_bytes=settings.shard_bytes,
                         next_shard=len(kept), next_key=sum(s["images"] for s in kept), shards=list(kept))
    first_file = kept[-1]["files"][1] if kept else 0
    state = {"image_size": image_size, "skipped": sum(len(s["skipped"]) for s in kept)}
    try:
        _write(writer, files, first_file, images_dir, len(folders), settings, workers, state,
               _Progress(progress, progress_every, len(folders)), on_shard)
    except BaseException:
        writer.abort()
        raise
    if writer.next_key == 0:
        raise PackError(f"{images_dir}: no readable image ({state['skipped']} skipped)")
    write_property(out_dir, len(folders), state["image_size"], writer.next_key)
    _save_manifest(writer, settings, state, len(folders), complete=True)
    return PackResult(writer.next_key, len(folders), len(writer.shards), state["skipped"], len(kept))


def _save_manifest(writer: ShardWriter, settings: PackSettings, state: dict, num_classes: int, *,
                   complete: bool) -> None:
    write_manifest(writer.out_dir, {
        "settings": settings.as_dict(), "image_size": list(state["image_size"] or ()), "num_classes": num_classes,
        "images": writer.next_key, "skipped": state["skipped"], "complete": complete, "shards": writer.shards})


def _write(writer: ShardWriter, files: Iterator[tuple[int, str]], file_index: int, images_dir: str,
           num_classes: int, settings: PackSettings, workers: int, state: dict, progress: _Progress, on_shard) -> None:
    """Write the record of every remaining file (`file_index`: the number of input files before them)."""
    shard = _OpenShard(file_index, hashlib.sha1(), [])
    for (label, path), (data, size, problem, stat) in _encoded(files, workers):
        if problem is None and state["image_size"] is None:
            state["image_size"] = size
        if problem is None and size != state["image_size"]:
            problem = (f"{path}: image is {size[1]}x{size[0]} but the first image is {state['image_size'][1]}x"
                       f"{state['image_size'][0]}; align/resize all images to one size")
        if problem is None:
            framed = _frame(float(label), data, writer.next_key)
            if writer.full(len(framed)):
                _close(writer, shard, file_index, settings, state, num_classes, on_shard)
                shard = _OpenShard(file_index, hashlib.sha1(), [])
            writer.add_framed(framed, label)
        elif settings.on_bad_image == "error":
            raise PackError(f"{problem}; fix or remove the file, or skip such files (data.on_bad_image=skip, "
                            "tools/pack_rec.py --skip-bad); finished shards are kept for a resume")
        else:
            print(f"skipping {problem}", file=sys.stderr, flush=True)
            shard.skipped.append(os.path.relpath(path, images_dir))
            state["skipped"] += 1
        shard.digest.update(_source_line(label, path, images_dir, stat))
        file_index += 1
        progress.update(writer.next_key, label, len(writer.shards), state["skipped"])
    _close(writer, shard, file_index, settings, state, num_classes, on_shard)
    progress.update(writer.next_key, num_classes - 1, len(writer.shards), state["skipped"], final=True)


def _frame(label: float, image: bytes, key: int) -> bytes:
    return encode_record(pack_header(label, image, id=key))


def _close(writer: ShardWriter, shard: _OpenShard, file_index: int, settings: PackSettings, state: dict,
           num_classes: int, on_shard) -> None:
    entry = writer.close(files=[shard.first_file, file_index], source_digest=shard.digest.hexdigest(),
                         skipped=shard.skipped)
    if entry is None:
        return
    _save_manifest(writer, settings, state, num_classes, complete=False)
    if on_shard is not None:
        on_shard(entry)
