"""Writing record sets: shards `train-00000.rec/.idx` of a bounded size, or one `train.rec`, plus
`property` and `manifest.json` (tools/pack_rec.py, tools/rec.py shuffle and merge).

Layout of what is written: RecBuilder's (images from key 0, keys global over the shards and
contiguous, no header or identity records), so every reader of insightface's files (largefr's,
insightface's MXFaceDataset, DALI's mxnet reader, mxnet's MXIndexedRecordIO) reads each shard as it
is. A shard appears under its name only when complete (written as `.tmp`, then renamed); the
manifest, rewritten atomically after every shard, is what a resumed run trusts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from largefr.data.rec_set import MANIFEST_FILE, SINGLE_REC, shard_name
from largefr.data.recordio import encode_record
from largefr.errors import UsageError

MANIFEST_VERSION = 1
_TMP = ".tmp"


def parse_size(text: str) -> int:
    """Bytes of '512M', '1G', '4096' (K, M, G, T: powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise UsageError(f"{text!r} is not a size (e.g. 512M, 1G or a number of bytes)") from None
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def write_atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_manifest(out_dir: str, manifest: dict) -> None:
    """`manifest.json`, sorted keys, no times: the same pack gives the same bytes."""
    write_atomic_text(os.path.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_property(out_dir: str, num_classes: int, image_size: tuple[int, int], num_images: int) -> None:
    """insightface's `num_classes,H,W`, and RecBuilder's second line: the number of images."""
    write_atomic_text(os.path.join(out_dir, "property"),
                      f"{num_classes},{image_size[0]},{image_size[1]}\n{num_images}\n")


@dataclass
class ShardWriter:
    """Appends records to the current shard; the caller decides when a shard closes (`full`, `close`)."""

    out_dir: str
    shard_images: int | None = None
    """Images per shard (None: no count limit)."""
    shard_bytes: int | None = None
    """Largest .rec of a shard, in bytes (None: no size limit); a single larger record gets a shard alone."""
    next_shard: int = 0
    next_key: int = 0
    single_file: bool = False
    """Write one train.rec/train.idx (no limits) instead of shards."""
    shards: list[dict] = field(default_factory=list)
    """The closed shards: name, first_key, images, rec_bytes, labels [min, max], plus the caller's fields."""
    _rec: BinaryIO | None = None
    _idx: TextIO | None = None
    _images: int = 0
    _labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    @property
    def open_images(self) -> int:
        """Images in the shard being written."""
        return self._images

    def _name(self) -> str:
        return SINGLE_REC[:-4] if self.single_file else shard_name(self.next_shard)

    def full(self, record_bytes: int) -> bool:
        """Whether the open shard must close before a record of `record_bytes` framed bytes."""
        if self.single_file or self._rec is None or self._images == 0:
            return False
        if self.shard_images is not None and self._images >= self.shard_images:
            return True
        return self.shard_bytes is not None and self._rec.tell() + record_bytes > self.shard_bytes

    def add(self, payload: bytes, label: int) -> int:
        """Frame and append one record (payload from recordio.pack_header); its key."""
        return self.add_framed(encode_record(payload), label)

    def add_framed(self, framed: bytes, label: int) -> int:
        if self._rec is None:
            base = os.path.join(self.out_dir, self._name())
            self._rec = open(base + ".rec" + _TMP, "wb")
            self._idx = open(base + ".idx" + _TMP, "w", encoding="ascii")
            self._labels = [label, label]
        key = self.next_key
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(framed)
        self._images += 1
        self._labels = [min(self._labels[0], label), max(self._labels[1], label)]
        self.next_key += 1
        return key

    def close(self, **extra: object) -> dict | None:
        """Close the open shard (renamed to its final name); its manifest entry, or None if none is open."""
        if self._rec is None:
            return None
        name, size = self._name(), self._rec.tell()
        self._rec.close()
        self._idx.close()
        base = os.path.join(self.out_dir, name)
        os.replace(base + ".idx" + _TMP, base + ".idx")
        os.replace(base + ".rec" + _TMP, base + ".rec")
        entry = {"name": name, "first_key": self.next_key - self._images, "images": self._images,
                 "rec_bytes": size, "labels": self._labels, **extra}
        self.shards.append(entry)
        self._rec = self._idx = None
        self._images = 0
        self.next_shard += 1
        return entry

    def abort(self) -> None:
        """Drop the open shard's temporary files (an interrupted or failed run)."""
        for handle in (self._rec, self._idx):
            if handle is not None:
                handle.close()
        base = os.path.join(self.out_dir, self._name())
        for suffix in (".rec" + _TMP, ".idx" + _TMP):
            if os.path.exists(base + suffix):
                os.remove(base + suffix)
        self._rec = self._idx = None
        self._images = 0
