"""Labelled face images of the user's own data: a folder of identity sub-folders, or a .rec.

- A folder `DIR/<identity>/<image>` (aligned crops of the model's input size; see
  `largefr.eval.embed`): images sorted by relative path, identities by sub-folder name.
- A .rec (the file, or the folder holding train.rec/train.idx): image records in file order, the
  identity of an image is its class label (scanned once and cached as for training,
  `largefr.data.image_index`); crops of another size are resized as the .bin loader does.

Every identity needs at least two images, or it gives no positive pair; `allow_singletons` lets
such identities through (they then only serve as impostors and non-mated probes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from largefr.eval.embed import ImageFolderError, labels_from_subfolders, list_images, read_aligned


@dataclass(kw_only=True)
class LabelledImages:
    source: str
    names: list[str]
    """One name per image (relative path, or 'key N' of a .rec), used in pair files and errors."""
    labels: np.ndarray
    """int64 identity index per image."""
    identities: list[str]
    """Name of each identity index (sub-folder name or class label)."""
    read: Callable[[int, int], np.ndarray]
    """read(image index, image size) -> H x W x 3 uint8 RGB."""

    def __len__(self) -> int:
        return len(self.names)


def is_rec_source(path: str) -> bool:
    return path.endswith(".rec") or os.path.isfile(os.path.join(path, "train.rec"))


def folder_images(folder: str) -> LabelledImages:
    names = list_images(folder)
    labels, identities = labels_from_subfolders(names)
    if labels is None:
        loose = next(n for n in names if os.sep not in n)
        raise ImageFolderError(f"{os.path.join(folder, loose)}: images must sit in identity sub-folders "
                               f"({folder}/<identity>/<image>); move the loose images into one")
    return LabelledImages(source=folder, names=names, labels=labels, identities=identities,
                          read=lambda i, size: read_aligned(os.path.join(folder, names[i]), size)[0])


def rec_images(path: str, cache_dir: str | None = None) -> LabelledImages:
    from largefr.data.image_index import prepare_image_index
    from largefr.data.recordio import RecordFile
    from largefr.data.verification_bin import decode_image

    folder = os.path.dirname(path) if path.endswith(".rec") else path
    index = prepare_image_index(folder, on_bad_image="error", cache_dir=cache_dir)
    file = RecordFile(index.rec_path)
    classes, labels = np.unique(index.labels, return_inverse=True)

    def read(i: int, size: int) -> np.ndarray:
        key = int(index.keys[i])
        _, data = file.read_sample_at(int(index.offsets[i]), key)
        return decode_image(data, size, f"{index.rec_path} key {key}")

    return LabelledImages(source=index.rec_path, names=[f"key {int(k)}" for k in index.keys],
                          labels=labels.reshape(-1).astype(np.int64), identities=[str(c) for c in classes], read=read)


def load_labelled_images(path: str, *, allow_singletons: bool = False, cache_dir: str | None = None) -> LabelledImages:
    """The images of `path` (identity folder or .rec; `cache_dir` as data.cache_dir), checked to form positive pairs."""
    images = rec_images(path, cache_dir) if is_rec_source(path) else folder_images(path)
    if len(images.identities) < 2:
        raise ImageFolderError(f"{path}: {len(images.identities)} identity; pairs of different identities need at "
                               "least two")
    counts = np.bincount(images.labels, minlength=len(images.identities))
    singles = np.flatnonzero(counts < 2)
    if singles.size and not allow_singletons:
        first = images.names[int(np.flatnonzero(images.labels == singles[0])[0])]
        raise ImageFolderError(f"{path}: identity {images.identities[singles[0]]!r} has one image ({first}) and so no "
                               f"positive pair ({singles.size} such identities); add images of it, remove it, or "
                               "allow such identities (they then serve only as impostors and non-mated probes)")
    return images
