"""Pack a folder of identity sub-folders into train.rec / train.idx / property (tools/pack_rec.py)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from largefr.data.image_index import cache_base
from largefr.data.recordio import write_insightface_rec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
JPEG_QUALITY = 95


class PackError(Exception):
    """The input folder cannot be packed; the message names the folder or file."""


def list_identities(images_dir: str) -> list[tuple[str, list[str]]]:
    """(identity folder, sorted image paths) in sorted folder-name order; label = position."""
    if not os.path.isdir(images_dir):
        raise PackError(f"{images_dir}: not a folder")
    folders = sorted(e.name for e in os.scandir(images_dir) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise PackError(f"{images_dir}: holds no identity sub-folders (expected one folder of images per identity)")
    identities = []
    for name in folders:
        folder = os.path.join(images_dir, name)
        files = sorted(e.path for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise PackError(f"{folder}: identity folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        identities.append((folder, files))
    return identities


def encode_for_rec(path: str) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes, (H, W)): JPEG files are kept as they are (after a check), others re-encoded."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = (image.height, image.width)
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data, size
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), size
    except Exception as err:
        raise PackError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def _samples(identities: list[tuple[str, list[str]]], image_size: tuple[int, int],
             progress: TextIO | None) -> Iterator[tuple[int, bytes]]:
    total, done, started = sum(len(files) for _, files in identities), 0, time.monotonic()
    for label, (_, files) in enumerate(identities):
        for path in files:
            data, size = encode_for_rec(path)
            if size != image_size:
                raise PackError(f"{path}: image is {size[1]}x{size[0]} but the first image is "
                                f"{image_size[1]}x{image_size[0]}; align/resize all images to one size")
            done += 1
            if progress is not None and (done % 10000 == 0 or done == total):
                rate = done / max(time.monotonic() - started, 1e-9)
                print(f"packed {done}/{total} images ({rate:.0f}/s)", file=progress, flush=True)
            yield label, data


def pack_image_folder(images_dir: str, out_dir: str, *, shuffle: bool = False, seed: int = 0,
                      progress: TextIO | None = sys.stderr) -> tuple[int, int]:
    """Pack `images_dir/<identity>/<image>` into `out_dir`; return (num_images, num_classes).

    Labels follow sorted folder names; JPEGs are stored as they are, other formats re-encoded as
    JPEG quality 95. Nothing is written to `out_dir` unless every image was read (atomic write).
    """
    identities = list_identities(images_dir)
    image_size = encode_for_rec(identities[0][1][0])[1]
    num_images = write_insightface_rec(out_dir, _samples(identities, image_size, progress),
                                       num_classes=len(identities), image_size=image_size, shuffle=shuffle, seed=seed)
    return num_images, len(identities)


_SOURCE_FILE = "source.json"  # written last: its presence and fingerprint mark a complete, current pack


def packed_folder_for(images_dir: str, cache_dir: str | None = None) -> str:
    """The folder where `images_dir` is packed for training (data.images): one per absolute path."""
    digest = hashlib.sha1(os.path.abspath(images_dir).encode()).hexdigest()[:16]
    return os.path.join(cache_base(cache_dir), f"images-{digest}")


def folder_fingerprint(images_dir: str) -> str:
    """A digest of every identity folder's image names, sizes and modification times."""
    digest = hashlib.sha1()
    for folder, files in list_identities(images_dir):
        digest.update(os.path.basename(folder).encode() + b"\0")
        for path in files:
            stat = os.stat(path)
            digest.update(f"{os.path.basename(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def ensure_packed(images_dir: str, cache_dir: str | None = None, *, progress: TextIO | None = sys.stderr) -> str:
    """Pack `images_dir` into its cache folder unless a pack of the same files is already there; the folder.

    One process at a time per folder (the trainer runs it on rank 0 while the others wait).
    """
    out_dir = packed_folder_for(images_dir, cache_dir)
    fingerprint = folder_fingerprint(images_dir)
    source_path = os.path.join(out_dir, _SOURCE_FILE)
    if os.path.isfile(source_path):
        with open(source_path, encoding="utf-8") as f:
            if json.load(f).get("fingerprint") == fingerprint:
                return out_dir
    if os.path.isdir(out_dir):  # a stale or interrupted pack: start over (old scans are tied to old files)
        shutil.rmtree(out_dir)
    if progress is not None:
        print(f"packing {images_dir} into {out_dir} (once; packed again when its files change)", file=progress)
    num_images, num_classes = pack_image_folder(images_dir, out_dir, progress=progress)
    tmp = f"{source_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"images": os.path.abspath(images_dir), "fingerprint": fingerprint, "num_images": num_images,
                   "num_classes": num_classes}, f)
    os.replace(tmp, source_path)
    return out_dir
