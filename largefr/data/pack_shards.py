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
import concurrent.futures
import hashlib
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from largefr.choices import BAD_IMAGE_POLICIES
from largefr.data.pack import IMAGE_EXTENSIONS, PackError, encode_for_rec
from largefr.data.rec_set import SHARD_PATTERN
from largefr.data.recordio import encode_record, pack_header
from largefr.data.shard_writer import (MANIFEST_VERSION, ShardWriter, read_manifest, write_manifest,
                                       write_property)

DEFAULT_SHARD_BYTES = 1 << 30
"""Shard size when neither a count nor a size is given: 1 GiB (a few hundred thousand 112 px faces)."""
_FOLDERS_PER_TASK = 8
"""Identity folders listed and read per task sent to a worker."""


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


def _image_names(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _empty_folder(folder: str) -> PackError:
    return PackError(f"{folder}: identity folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")


def iter_files(images_dir: str, folders: list[str]) -> Iterator[tuple[int, str, int]]:
    """(label, path relative to images_dir, number in its folder) of every image, folder by folder."""
    for label, name in enumerate(folders):
        names = _image_names(os.path.join(images_dir, name))
        if not names:
            raise _empty_folder(os.path.join(images_dir, name))
        for number, file_name in enumerate(names):
            yield label, f"{name}/{file_name}", number


def _source_line(label: int, relative: str, stat: tuple[int, int]) -> bytes:
    """What the digest of a shard's input records of one file: label, name, size, mtime."""
    return f"{label}\0{relative}\0{stat[0]}\0{stat[1]}\n".encode()


def _stat(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


Encoded = tuple[bytes | None, tuple[int, int] | None, str | None, tuple[int, int]]
"""(image bytes, (H, W), None, (size, mtime)) or (None, None, problem, (size, mtime)) of one file."""
Packed = tuple[int, str, Encoded]
"""(label, path relative to images_dir, what reading it gave) of one file."""


def _encode_file(path: str) -> Encoded:
    stat = _stat(path)
    try:
        data, size = encode_for_rec(path)
        return data, size, None, stat
    except (PackError, OSError) as err:
        return None, None, str(err), stat


def _encode_folders(images_dir: str, task: list[tuple[int, str, int]]) -> list[Packed] | PackError:
    """List and read the images of identity folders (label, name, files of it to leave out), in a worker."""
    out = []
    for label, name, skip in task:
        folder = os.path.join(images_dir, name)
        names = _image_names(folder)
        if not names:
            return _empty_folder(folder)
        out += [(label, f"{name}/{file_name}", _encode_file(os.path.join(folder, file_name)))
                for file_name in names[skip:]]
    return out


def _tasks(folders: list[str], start: tuple[int, int]) -> Iterator[list[tuple[int, str, int]]]:
    """Folders from `start` (folder number, files of it already packed), _FOLDERS_PER_TASK at a time."""
    first, skip = start
    for at in range(first, len(folders), _FOLDERS_PER_TASK):
        yield [(label, folders[label], skip if label == first else 0)
               for label in range(at, min(at + _FOLDERS_PER_TASK, len(folders)))]


def _encoded(images_dir: str, folders: list[str], start: tuple[int, int], workers: int) -> Iterator[Packed]:
    """Every file from `start` on, in input order; listing and reading run in the workers, at most 4
    tasks per worker in flight (bounded memory)."""
    def unpacked(result: list[Packed] | PackError) -> list[Packed]:
        if isinstance(result, PackError):
            raise result
        return result

    if workers <= 1:
        for task in _tasks(folders, start):
            yield from unpacked(_encode_folders(images_dir, task))
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch's threads
    # an executor, not a Pool: a worker that dies raises BrokenProcessPool here instead of hanging
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for task in _tasks(folders, start):
            pending.append(pool.submit(_encode_folders, images_dir, task))
            if len(pending) >= 4 * workers:
                yield from unpacked(pending.popleft().result())
        while pending:
            yield from unpacked(pending.popleft().result())


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
              folders: list[str]) -> tuple[list[dict], tuple[int, int] | None]:
    """(finished shards whose input is unchanged, where packing resumes: (folder number, files of it
    already packed), or None when a complete pack is up to date)."""
    if manifest is None:
        return [], (0, 0)
    if manifest.get("settings") != settings.as_dict():
        raise PackError(f"{out_dir}: was packed with {manifest.get('settings')}, not {settings.as_dict()}; "
                        "pack into another folder (--out) or delete this one")
    listing = iter_files(images_dir, folders)
    kept: list[dict] = []
    starts, position = [], (0, 0)
    for shard in manifest["shards"]:
        start, end = shard["files"]
        taken = list(itertools.islice(listing, end - start))
        digest = hashlib.sha1()
        for label, relative, _ in taken:
            digest.update(_source_line(label, relative, _stat(os.path.join(images_dir, relative))))
        if len(taken) != end - start or digest.hexdigest() != shard["source_digest"]:
            return kept, position
        kept.append(shard)
        starts.append(position)
        position = (taken[-1][0], taken[-1][2] + 1) if taken else position
    if manifest.get("complete") and kept:
        if next(listing, None) is None:
            return kept, None
        kept.pop()  # new files after a complete pack: its last shard is packed again
        return kept, starts[-1]
    return kept, position


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
    if settings.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {settings.on_bad_image!r}")
    folders = identity_folders(images_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "train.rec")):
        raise PackError(f"{out_dir}: holds train.rec (a single-file data set); pack shards into another folder")
    manifest = read_manifest(out_dir)
    kept, start = _reusable(manifest, settings, images_dir, out_dir, folders)
    _remove_unlisted(out_dir, {shard["name"] for shard in kept})
    if start is None:
        return PackResult(manifest["images"], len(folders), len(kept), manifest["skipped"], len(kept))
    image_size = tuple(manifest["image_size"]) if kept else None
    writer = ShardWriter(out_dir, shard_images=settings.shard_images, shard_bytes=settings.shard_bytes,
                         next_shard=len(kept), next_key=sum(s["images"] for s in kept), shards=list(kept))
    first_file = kept[-1]["files"][1] if kept else 0
    state = {"image_size": image_size, "skipped": sum(len(s["skipped"]) for s in kept)}
    try:
        _write(writer, _encoded(images_dir, folders, start, workers), first_file, images_dir, len(folders), settings,
               state, _Progress(progress, progress_every, len(folders)), on_shard)
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


def _write(writer: ShardWriter, files: Iterator[Packed], file_index: int, images_dir: str, num_classes: int,
           settings: PackSettings, state: dict, progress: _Progress, on_shard) -> None:
    """Write the record of every remaining file (`file_index`: the number of input files before them)."""
    shard = _OpenShard(file_index, hashlib.sha1(), [])
    for label, path, (data, size, problem, stat) in files:
        if problem is None and state["image_size"] is None:
            state["image_size"] = size
        if problem is None and size != state["image_size"]:
            problem = (f"{os.path.join(images_dir, path)}: image is {size[1]}x{size[0]} but the first image is {state['image_size'][1]}x"
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
            shard.skipped.append(path)
            state["skipped"] += 1
        shard.digest.update(_source_line(label, path, stat))
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
