"""The validated list of image records of a record set (data.rec), scanned once and cached next to the data.

DALI's mxnet reader reads every offset of the index it is given, insightface's header and
identity records included (DALI issue 2806), and trusts every length it finds (no bounds checks).
So before DALI sees a file, every image record is checked (largefr/data/scan.py, vectorised): frame
magic, length inside the file, payload header, an integral label, and that the bytes start like an
image (JPEG, PNG, BMP, WebP, TIFF, JPEG 2000, PNM). Each file's scan is cached on its own
(largefr/data/index_cache.py), so one changed shard is scanned again alone; ranks sharing the cache
folder take turns on a file lock, so a node scans once. The images of all files form one global
order (file order, then offset order), which both loaders shard the same way. DALI gets one index of
exactly these records with global offsets (written on first use).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from largefr.choices import BAD_IMAGE_POLICIES
from largefr.data.index_cache import (DALI_INDEX_SUFFIX, LOCK_NAME, cache_base, cache_dir_for, cache_path,
                                      exclusive, scan_missing, set_tag, write_dali_index)
from largefr.data.rec_set import RecSet, resolve_rec_set
from largefr.data.recordio import BadImageError, RecordIOError

logger = logging.getLogger(__name__)

SCAN_PROGRESS_EVERY = 10.0
"""Seconds between the progress lines of a long scan."""

__all__ = ["ImageIndex", "cache_base", "counts_from_data", "prepare_image_index"]


@dataclass(frozen=True, kw_only=True)
class ImageIndex:
    """Validated image records of a record set, in file order then offset order."""

    rec_paths: tuple[str, ...]
    """The .rec files, in reading order."""
    file_starts: np.ndarray
    """int64, len(rec_paths) + 1: the images of file f are positions file_starts[f] .. file_starts[f+1]-1."""
    keys: np.ndarray
    """int64 record keys of the usable images (keys of different files may repeat)."""
    offsets: np.ndarray
    """int64 byte offsets of those records in their .rec."""
    labels: np.ndarray
    """int64 class label of each image."""
    dali_index_path: str
    """Where the `key\\toffset` index of exactly these records for DALI is (see dali_index())."""
    bad_keys: tuple[int, ...] = ()
    """Keys skipped because their bytes are not an image (on_bad_image='skip')."""
    source: str = ""
    """data.rec as given, for messages."""
    rec_stats: tuple[tuple[int, int], ...] = ()
    """(size, mtime in ns) of each .rec when it was scanned (the index cache's tag): `check_unchanged`."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def rec_path(self) -> str:
        """The one .rec, or data.rec as given for a set of several (for messages)."""
        return self.rec_paths[0] if len(self.rec_paths) == 1 else self.source

    def file_of(self, position: int) -> int:
        return int(np.searchsorted(self.file_starts, position, side="right")) - 1

    def record(self, position: int) -> tuple[str, int, int]:
        """(.rec path, key, offset) of the image at `position`."""
        return self.rec_paths[self.file_of(position)], int(self.keys[position]), int(self.offsets[position])

    def where(self, position: int) -> str:
        path, key, offset = self.record(position)
        return f"{path} key {key} (offset {offset})"

    def position_of(self, rec_path: str, offset: int) -> int:
        """Position of the record at `offset` in file `rec_path` (as DALI's source_info names it)."""
        number = self.rec_paths.index(rec_path)
        start, end = int(self.file_starts[number]), int(self.file_starts[number + 1])
        return start + int(np.searchsorted(self.offsets[start:end], offset))

    def dali_index(self) -> str:
        """The DALI index of these records (global offsets over rec_paths), written on first use."""
        if not os.path.exists(self.dali_index_path):  # named after the scanned files: never stale
            write_dali_index(self.dali_index_path, self.keys, self.offsets, self.file_starts, self.rec_paths)
        return self.dali_index_path

    def check_unchanged(self) -> None:
        """Raise naming the first .rec deleted, truncated or rewritten since its scan (a reader that trusts the
        index would read past its end: DALI's memory-mapped reader dies of SIGBUS)."""
        for path, (size, mtime_ns) in zip(self.rec_paths, self.rec_stats):
            try:
                now = os.stat(path)
            except FileNotFoundError:
                raise RecordIOError(f"{path}: deleted or moved during the run (it held {size} bytes at start-up); "
                                    "put it back and rerun with --resume auto") from None
            if (now.st_size, now.st_mtime_ns) != (size, mtime_ns):
                how = "truncated" if now.st_size < size else "rewritten"
                raise RecordIOError(f"{path}: {how} during the run ({size} bytes at start-up, {now.st_size} now; "
                                    "modified since): the index of its records no longer holds. Restore the file, "
                                    "or rerun with --resume auto to scan it again")

    def check_labels(self, num_classes: int) -> None:
        """Error naming the first record whose label is negative or >= num_classes."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            path, key, _ = self.record(i)
            raise RecordIOError(f"{path} key {key}: label {int(self.labels[i])} is outside [0, {num_classes}) "
                                f"({bad.size} such records); data.num_classes must cover every label, or the "
                                "file is corrupt")


def _load(paths: Sequence[str], rec_set: RecSet, dali_path: str,
          rec_stats: tuple[tuple[int, int], ...]) -> tuple[ImageIndex, list[tuple[str, int, int]]]:
    """The index assembled from the per-file caches, and the (file, key, offset) of not-image records.

    Column by column, file by file: the memory is the assembled arrays plus one file's column.
    """
    sizes, bad = [], []
    for file, path in zip(rec_set.files, paths):
        with np.load(path) as cached:
            sizes.append(len(cached["labels"]))
            bad += [(file.rec, int(k), int(o)) for k, o in zip(cached["bad_keys"], cached["bad_offsets"])]
    file_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    columns = {name: np.empty(int(file_starts[-1]), np.int64) for name in ("keys", "offsets", "labels")}
    for name, out in columns.items():
        for number, path in enumerate(paths):
            with np.load(path) as cached:
                out[file_starts[number]:file_starts[number + 1]] = cached[name]
    index = ImageIndex(rec_paths=tuple(f.rec for f in rec_set.files), file_starts=file_starts,
                       dali_index_path=dali_path, bad_keys=tuple(k for _, k, _ in bad), source=rec_set.source,
                       rec_stats=rec_stats, **columns)
    return index, bad


def _apply_policy(bad: list[tuple[str, int, int]], on_bad_image: str) -> None:
    if not bad:
        return
    path, key, offset = bad[0]
    if on_bad_image == "error":
        raise BadImageError(f"{path} key {key} (offset {offset}): the record does not hold an encoded image "
                            f"({len(bad)} such records); set data.on_bad_image=skip to skip such records, or "
                            "re-pack the data")
    named = ", ".join(f"{os.path.basename(p)} key {k}" for p, k, _ in bad[:10])
    logger.warning("skipped %d records that are not images (%s%s)", len(bad), named, " ..." if len(bad) > 10 else "")


def _check_property_classes(rec_set: RecSet, num_classes: int | None) -> None:
    prop = rec_set.property()
    if num_classes is not None and prop is not None and prop[0] != num_classes:
        where = os.path.join(rec_set.property_dirs[0], "property")
        raise RecordIOError(f"{where}: says {prop[0]} classes but the config has data.num_classes={num_classes}; "
                            f"set data.num_classes={prop[0]}")


def prepare_image_index(rec: str | Sequence[str], *, num_classes: int | None = None, on_bad_image: str = "error",
                        cache_dir: str | None = None, workers: int | None = None,
                        progress_every: float | None = SCAN_PROGRESS_EVERY) -> ImageIndex:
    """Scan (or load the cached scans of) the record set `rec` names; check property and labels.

    `workers`: processes scanning files in parallel (default: up to 8, one per CPU core).
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    rec_set = resolve_rec_set(rec)
    _check_property_classes(rec_set, num_classes)
    rec_stats = tuple((stat.st_size, stat.st_mtime_ns) for stat in (os.stat(file.rec) for file in rec_set.files))
    paths = [cache_path(file, cache_dir) for file in rec_set.files]
    folder = cache_dir_for(os.path.dirname(os.path.abspath(rec_set.files[0].rec)), cache_dir)
    stem = os.path.splitext(os.path.basename(rec_set.files[0].rec))[0]
    dali_path = os.path.join(folder, f"{stem}{DALI_INDEX_SUFFIX}{set_tag(rec_set.files)}.idx")
    if not all(os.path.exists(path) for path in paths):
        with exclusive(os.path.join(folder, LOCK_NAME)):
            if not all(os.path.exists(path) for path in paths):  # another rank may have scanned while this one waited
                workers = workers if workers is not None else min(8, os.cpu_count() or 1)
                scan_missing(rec_set.files, paths, workers=workers, progress_every=progress_every)
    index, bad = _load(paths, rec_set, dali_path, rec_stats)
    _apply_policy(bad, on_bad_image)
    if len(index) == 0:
        raise RecordIOError(f"{index.rec_path}: holds no usable image records")
    if num_classes is not None:
        index.check_labels(num_classes)
    return index


def counts_from_data(rec: str | Sequence[str], index: ImageIndex, *, num_classes: int | None = None,
                     num_images: int | None = None) -> tuple[int, int]:
    """(num_classes, num_images) the data holds, checked against the values the config gives (None: not given).

    Classes: the property file's count, else the largest label + 1. Images: the usable images of the scan.
    """
    rec_set = resolve_rec_set(rec)
    prop = rec_set.property()
    found_classes = prop[0] if prop is not None else int(index.labels.max()) + 1
    source = (os.path.join(rec_set.property_dirs[0], "property") if prop is not None
              else f"{index.rec_path} (largest label + 1; no property file)")
    if num_classes is not None and num_classes != found_classes:
        raise RecordIOError(f"{source}: says {found_classes} classes but the config has data.num_classes="
                            f"{num_classes}; set data.num_classes={found_classes}, or data.num_classes=null to read "
                            "it from the data")
    index.check_labels(found_classes)
    skipped = f" ({len(index.bad_keys)} records that are not images left out)" if index.bad_keys else ""
    if num_images is not None and num_images != len(index):
        raise RecordIOError(f"{index.rec_path}: holds {len(index)} usable images{skipped} but the config has "
                            f"data.num_images={num_images}; set data.num_images={len(index)}, or "
                            "data.num_images=null to count them")
    return found_classes, len(index)
