"""The validated list of image records of a .rec, scanned once and cached next to the data.

DALI's mxnet reader reads every offset of the index it is given, insightface's header and
identity records included (DALI issue 2806), and trusts every length it finds (no bounds checks).
So before DALI sees a file, every image record is checked here: frame magic, length inside the file,
payload header, an integral label, and that the bytes start like an image (JPEG, PNG, BMP, WebP,
TIFF, JPEG 2000, PNM). The result is written as a DALI index of image keys only (`key\\toffset`)
plus a .npz of keys, offsets and labels, named after the sizes and modification times of the .idx and
the .rec, so that a changed data set (a .rec rewritten in place included) is scanned again. Ranks
sharing the cache folder take turns on a file lock, so a node scans once. Both loaders use the
result, which keeps their shards identical.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from largefr.data.recordio import (IR_HEADER_SIZE, RECORDIO_MAGIC, BadImageError, IndexedRecordReader,
                                   RecordIOError, first_label, read_property, read_property_file,
                                   unpack_header)

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
                     b"\x00\x00\x00\x0cjP  \r\n", b"\xffO\xffQ", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_SCAN_BYTES = 64


def looks_like_image(data: bytes) -> bool:
    """True when `data` starts with the signature of an image format the decoders read."""
    if data[:4] == b"RIFF":
        return data[8:12] == b"WEBP"
    return data.startswith(_IMAGE_SIGNATURES)


@dataclass(frozen=True, kw_only=True)
class ImageIndex:
    """Validated image records of one .rec, in file order."""

    rec_path: str
    """The .rec file."""
    keys: np.ndarray
    """int64 record keys of the usable images."""
    offsets: np.ndarray
    """int64 byte offsets of those records in the .rec."""
    labels: np.ndarray
    """int64 class label of each image."""
    dali_index_path: str
    """A `key\\toffset` index of exactly these records, for DALI's mxnet reader."""
    bad_keys: tuple[int, ...] = ()
    """Keys skipped because their bytes are not an image (on_bad_image='skip')."""

    def __len__(self) -> int:
        return len(self.keys)

    def check_labels(self, num_classes: int) -> None:
        """Error naming the first key whose label is negative or >= num_classes."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(f"{self.rec_path} key {int(self.keys[i])}: label {int(self.labels[i])} is outside "
                                f"[0, {num_classes}) ({bad.size} such records); data.num_classes must cover every "
                                "label, or the file is corrupt")


def cache_base(cache_dir: str | None) -> str:
    """Where largefr keeps what it derives from data: `cache_dir`, else $LARGEFR_CACHE, else ~/.cache/largefr."""
    return cache_dir or os.environ.get("LARGEFR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "largefr")


def _cache_dir_for(rec_dir: str, cache_dir: str | None) -> str:
    if cache_dir is None and os.access(rec_dir, os.W_OK):
        return rec_dir
    base = cache_base(cache_dir)
    folder = os.path.join(base, hashlib.sha1(os.path.abspath(rec_dir).encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    return folder


def _cache_tag(path_rec: str, path_idx: str) -> str:
    idx_stat, rec_stat = os.stat(path_idx), os.stat(path_rec)
    return f"{idx_stat.st_size}-{idx_stat.st_mtime_ns}-{rec_stat.st_size}-{rec_stat.st_mtime_ns}"


def _scan_record(mm: mmap.mmap, reader: IndexedRecordReader, key: int, offset: int) -> tuple[float, bytes]:
    """(label, first image bytes) of an image record; RecordIOError on a broken frame or header."""
    where = f"{reader.path_rec} key {key}"
    if offset + 8 > len(mm):
        raise RecordIOError(f"{where}: offset {offset} is past the end of the file ({len(mm)} bytes)")
    magic, lrec = struct.unpack_from("<II", mm, offset)
    length = lrec & ((1 << 29) - 1)
    if magic != RECORDIO_MAGIC or lrec >> 29 != 0:  # bad magic, or a rare multi-part record: full read
        flag, label, _, _, image = unpack_header(reader.read(key))
        return first_label(label), image[:16]
    if offset + 8 + length > len(mm):
        raise RecordIOError(f"{where}: record at offset {offset} declares {length} bytes but the file ends at "
                            f"{len(mm)}: the .rec is truncated; re-copy or re-pack it")
    head = bytes(mm[offset + 8: offset + 8 + min(length, _SCAN_BYTES)])
    if len(head) < IR_HEADER_SIZE:
        raise RecordIOError(f"{where}: record of {length} bytes is too short for an image header")
    flag = struct.unpack_from("<I", head)[0]
    if IR_HEADER_SIZE + 4 * flag + 16 > len(head):
        head = bytes(mm[offset + 8: offset + 8 + min(length, IR_HEADER_SIZE + 4 * flag + 16)])
    try:
        _, label, _, _, image = unpack_header(head)
    except RecordIOError as err:
        raise RecordIOError(f"{where}: {err}") from None
    return first_label(label), image


def _scan(reader: IndexedRecordReader, on_bad_image: str) -> tuple[list[int], list[int], list[int], list[int]]:
    keys, offsets, labels, bad = [], [], [], []
    image_keys = reader.image_keys()
    with open(reader.path_rec, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for key in image_keys:
            offset = reader.offsets[key]
            label, image_head = _scan_record(mm, reader, key, offset)
            if label != int(label):
                raise RecordIOError(f"{reader.path_rec} key {key}: label {label} is not an integer class id")
            if not looks_like_image(image_head):
                if on_bad_image == "error":
                    raise BadImageError(f"{reader.path_rec} key {key} (offset {offset}): the record does not hold "
                                        f"an encoded image (starts with {image_head[:8]!r}); set "
                                        "data.on_bad_image=skip to skip such records, or re-pack the data")
                bad.append(key)
                continue
            keys.append(key)
            offsets.append(offset)
            labels.append(int(label))
    return (*_in_file_order(reader, keys, offsets, labels), bad)


def _in_file_order(reader: IndexedRecordReader, keys: list[int], offsets: list[int], labels: list[int]):
    """Sort by offset (DALI reads in offset order) and refuse two keys sharing one record."""
    order = np.argsort(np.asarray(offsets, np.int64), kind="stable")
    sorted_offsets = np.asarray(offsets, np.int64)[order]
    shared = np.flatnonzero(np.diff(sorted_offsets) == 0)
    if shared.size:
        i = int(order[shared[0]])
        raise RecordIOError(f"{reader.path_idx}: key {keys[i]} and another key both point at offset {offsets[i]}; "
                            "the index is corrupt, rebuild it")
    return [keys[i] for i in order], sorted_offsets.tolist(), [labels[i] for i in order]


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """One process at a time (an flock): the ranks of a node scan once, not once each.

    A rank that fails the scan releases the lock; the next one scans and fails the same way, so every
    rank still reports the problem itself.
    """
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a file system without locks: every rank scans, as correct, only slower
            logger.info("%s: no file lock (%s); this rank scans on its own", lock_path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_cache(folder: str, stem: str, keys, offsets, labels, bad) -> None:
    tmp = f".tmp-{os.getpid()}"
    with open(os.path.join(folder, stem + ".idx" + tmp), "w", encoding="ascii") as f:
        f.writelines(f"{k}\t{o}\n" for k, o in zip(keys, offsets))
    with open(os.path.join(folder, stem + ".npz" + tmp), "wb") as f:
        np.savez(f, keys=np.asarray(keys, np.int64), offsets=np.asarray(offsets, np.int64),
                 labels=np.asarray(labels, np.int64), bad_keys=np.asarray(bad, np.int64))
    for suffix in (".npz", ".idx"):  # the .idx last: its presence marks a complete cache
        os.replace(os.path.join(folder, stem + suffix + tmp), os.path.join(folder, stem + suffix))


def prepare_image_index(rec_dir: str, *, num_classes: int | None = None, on_bad_image: str = "error",
                        cache_dir: str | None = None) -> ImageIndex:
    """Scan (or load the cached scan of) `rec_dir/train.rec`; check property and labels."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    path_rec, path_idx = os.path.join(rec_dir, "train.rec"), os.path.join(rec_dir, "train.idx")
    if num_classes is not None and os.path.exists(os.path.join(rec_dir, "property")):
        prop_classes = read_property(rec_dir)[0]
        if prop_classes != num_classes:
            raise RecordIOError(f"{os.path.join(rec_dir, 'property')}: says {prop_classes} classes but the config "
                                f"has data.num_classes={num_classes}; set data.num_classes={prop_classes}")
    for path in (path_rec, path_idx):
        if not os.path.isfile(path):
            raise RecordIOError(f"{path}: no such file (data.rec must hold train.rec, train.idx and property)")
    folder = _cache_dir_for(rec_dir, cache_dir)
    stem = f"train.images-{on_bad_image}-{_cache_tag(path_rec, path_idx)}"
    cached_idx = os.path.join(folder, stem + ".idx")  # present: the scan validated the files it is tied to
    if not os.path.exists(cached_idx):
        with _exclusive(os.path.join(folder, "train.images.lock")):
            if not os.path.exists(cached_idx):  # another rank may have scanned while this one waited
                with IndexedRecordReader(path_rec, path_idx) as reader:
                    _write_cache(folder, stem, *_scan(reader, on_bad_image))
    with np.load(os.path.join(folder, stem + ".npz")) as cached:
        index = ImageIndex(rec_path=path_rec, keys=cached["keys"], offsets=cached["offsets"],
                           labels=cached["labels"], dali_index_path=os.path.join(folder, stem + ".idx"),
                           bad_keys=tuple(int(k) for k in cached["bad_keys"]))
    if index.bad_keys:
        logger.warning("%s: skipped %d records that are not images (keys %s%s)", path_rec, len(index.bad_keys),
                       list(index.bad_keys[:10]), " ..." if len(index.bad_keys) > 10 else "")
    if len(index) == 0:
        raise RecordIOError(f"{path_rec}: holds no usable image records")
    if num_classes is not None:
        index.check_labels(num_classes)
    return index


def counts_from_data(rec_dir: str, index: ImageIndex, *, num_classes: int | None = None,
                     num_images: int | None = None) -> tuple[int, int]:
    """(num_classes, num_images) the data holds, checked against the values the config gives (None: not given).

    Classes: the property file's count, else the largest label + 1. Images: the usable images of the scan.
    """
    path = os.path.join(rec_dir, "property")
    has_property = os.path.exists(path)
    found_classes = read_property_file(rec_dir)[0] if has_property else int(index.labels.max()) + 1
    source = path if has_property else f"{index.rec_path} (largest label + 1; no property file)"
    if num_classes is not None and num_classes != found_classes:
        raise RecordIOError(f"{source}: says {found_classes} classes but the config has data.num_classes="
                            f"{num_classes}; set data.num_classes={found_classes} or leave it out to read it")
    index.check_labels(found_classes)
    skipped = f" ({len(index.bad_keys)} records that are not images left out)" if index.bad_keys else ""
    if num_images is not None and num_images != len(index):
        raise RecordIOError(f"{index.rec_path}: holds {len(index)} usable images{skipped} but the config has "
                            f"data.num_images={num_images}; set data.num_images={len(index)} or leave it out to "
                            "count them")
    return found_classes, len(index)
