"""Reading images for packing, the single-file pack (train.rec / train.idx / property), and data.images.

The sharded, parallel, resumable pack is largefr/data/pack_shards.py; ensure_packed uses it.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from largefr.data.index_cache import cache_base
from largefr.data.recordio import write_insightface_rec
from largefr.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
JPEG_QUALITY = 95


class PackError(UserError):
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


def packed_folder_for(images_dir: str, cache_dir: str | None = None) -> str:
    """The folder where `images_dir` is packed for training (data.images): one per absolute path."""
    digest = hashlib.sha1(os.path.abspath(images_dir).encode()).hexdigest()[:16]
    return os.path.join(cache_base(cache_dir), f"images-{digest}")


def ensure_packed(images_dir: str, cache_dir: str | None = None, *, progress: TextIO | None = sys.stderr,
                  workers: int | None = None, on_bad_image: str = "error") -> str:
    """Pack `images_dir` into shards in its cache folder, or bring an earlier pack up to date; the folder.

    Shards whose input files are unchanged are kept (largefr/data/pack_shards.py): an unchanged
    folder costs one listing and one stat per file, a stopped pack resumes. One process at a time per
    folder (the trainer runs it on rank 0 while the others wait).
    """
    from largefr.data.pack_shards import DEFAULT_SHARD_BYTES, PackSettings, pack_shards
    from largefr.data.shard_writer import read_manifest

    out_dir = packed_folder_for(images_dir, cache_dir)
    settings = PackSettings(shard_bytes=DEFAULT_SHARD_BYTES, on_bad_image=on_bad_image)
    if os.path.isdir(out_dir):
        manifest = read_manifest(out_dir)
        if manifest is None or manifest.get("settings") != settings.as_dict():  # an older or other pack
            shutil.rmtree(out_dir)
    if progress is not None and not os.path.isdir(out_dir):
        print(f"packing {images_dir} into {out_dir} (once; shards of changed files are packed again)", file=progress)
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 1)))
    pack_shards(images_dir, out_dir, settings=settings, workers=workers, progress=progress)
    return out_dir
