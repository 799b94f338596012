"""Rewrite record sets: shuffle one, merge several (tools/rec.py shuffle, merge).

Inputs are any layout the scan reads (insightface's faces_emore with header and identity records,
RecBuilder's images from key 0 with scalar or vector labels, im2rec's keys from its .lst, shard
sets); the image records are copied (payload bytes unchanged but for merge's label offset) into
RecBuilder's layout (writer: largefr/data/shard_writer.py), one train.rec or shards. Memory: the
scanned index arrays (int64 keys, offsets, labels) plus one record; records are read with pread.
"""
from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from largefr.data.image_index import ImageIndex, prepare_image_index
from largefr.data.rec_set import MANIFEST_FILE, SINGLE_REC, resolve_rec_set
from largefr.data.recordio import IR_HEADER_SIZE, RecordFile, RecordIOError, encode_record
from largefr.data.shard_writer import ShardWriter, write_manifest, write_property


def _image_size(rec: str | Sequence[str], index: ImageIndex) -> tuple[int, int]:
    prop = resolve_rec_set(rec).property()
    if prop is not None:
        return prop[1], prop[2]
    import io

    from PIL import Image

    path, key, offset = index.record(0)
    with Image.open(io.BytesIO(RecordFile(path).read_sample_at(offset, key)[1])) as image:
        return image.height, image.width


def _classes(rec: str | Sequence[str], index: ImageIndex) -> int:
    prop = resolve_rec_set(rec).property()
    return prop[0] if prop is not None else int(index.labels.max()) + 1


def relabelled(payload: bytes, offset: int) -> bytes:
    """`payload` with its class label (the scalar, or the first of a label vector) moved by `offset`."""
    if offset == 0:
        return payload
    flag, label = struct.unpack_from("<If", payload)
    at = 4 if flag == 0 else IR_HEADER_SIZE
    value = (label if flag == 0 else struct.unpack_from("<f", payload, at)[0]) + offset
    return payload[:at] + struct.pack("<f", value) + payload[at + 4:]


def _check_out(out: str, inputs: Sequence[str]) -> None:
    taken = [name for name in (SINGLE_REC, MANIFEST_FILE) if os.path.exists(os.path.join(out, name))]
    if taken:
        raise RecordIOError(f"{out}: already holds {taken[0]}; write into a new folder (--out)")
    for entry in inputs:
        if os.path.abspath(entry) == os.path.abspath(out):
            raise RecordIOError(f"{out}: is also an input; write into a new folder (--out)")


def _writer(out: str, shard_images: int | None, shard_bytes: int | None) -> ShardWriter:
    single = shard_images is None and shard_bytes is None
    return ShardWriter(out, shard_images=shard_images, shard_bytes=shard_bytes, single_file=single)


def _copy(writer: ShardWriter, sources: list[tuple[ImageIndex, int]], order, progress: TextIO | None,
          progress_every: float, total: int) -> None:
    """Copy records (source number, position) in `order`, closing shards at the writer's limits."""
    files = [[RecordFile(path) for path in index.rec_paths] for index, _ in sources]
    started = shown = time.monotonic()
    for done, (source, position) in enumerate(order, 1):
        index, label_offset = sources[source]
        number = index.file_of(position)
        payload = files[source][number].read_at(int(index.offsets[position]), int(index.keys[position]))
        framed = encode_record(relabelled(payload, label_offset))
        if writer.full(len(framed)):
            writer.close()
        writer.add_framed(framed, int(index.labels[position]) + label_offset)
        if progress is not None and time.monotonic() - shown >= progress_every:
            shown = time.monotonic()
            rate = done / max(shown - started, 1e-9)
            print(f"wrote {done:,}/{total:,} records, {rate:,.0f} records/s, ETA {(total - done) / rate:.0f} s",
                  file=progress, flush=True)
    writer.close()
    for per_source in files:
        for file in per_source:
            file.close()


def _finish(writer: ShardWriter, out: str, classes: int, image_size: tuple[int, int], what: dict) -> None:
    write_property(out, classes, image_size, writer.next_key)
    if not writer.single_file:
        write_manifest(out, {"settings": {"shard_images": writer.shard_images, "shard_bytes": writer.shard_bytes},
                             **what, "images": writer.next_key, "num_classes": classes,
                             "image_size": list(image_size), "complete": True, "shards": writer.shards})


def shuffle(rec: str | Sequence[str], out: str, *, seed: int = 0, shard_images: int | None = None,
            shard_bytes: int | None = None, cache_dir: str | None = None, progress: TextIO | None = sys.stderr,
            progress_every: float = 10.0) -> int:
    """Write the image records of `rec` in a seeded random order into `out`; the number written."""
    _check_out(out, [rec] if isinstance(rec, str) else rec)
    index = prepare_image_index(rec, on_bad_image="skip", cache_dir=cache_dir)
    order = np.random.default_rng(seed).permutation(len(index))
    writer = _writer(out, shard_images, shard_bytes)
    try:
        _copy(writer, [(index, 0)], ((0, int(p)) for p in order), progress, progress_every, len(index))
    except BaseException:
        writer.abort()
        raise
    _finish(writer, out, _classes(rec, index), _image_size(rec, index), {"shuffled": {"seed": seed}})
    return writer.next_key


def merge(recs: Sequence[str], out: str, *, keep_labels: bool = False, shard_images: int | None = None,
          shard_bytes: int | None = None, cache_dir: str | None = None, progress: TextIO | None = sys.stderr,
          progress_every: float = 10.0) -> tuple[int, int]:
    """Concatenate the sets `recs` into `out`; (images, classes).

    Labels of each input move past the classes of the inputs before it (their property's count, else
    largest label + 1), unless keep_labels (the inputs share one identity numbering).
    """
    _check_out(out, recs)
    sources, offset, classes, sizes = [], 0, 0, set()
    for rec in recs:
        index = prepare_image_index(rec, on_bad_image="skip", cache_dir=cache_dir)
        count = _classes(rec, index)
        sources.append((index, 0 if keep_labels else offset))
        offset += count
        classes = max(classes, count) if keep_labels else offset
        sizes.add(_image_size(rec, index))
    if len(sizes) > 1:
        raise RecordIOError(f"the inputs hold images of different sizes {sorted(sizes)}; merge sets of one size")
    writer = _writer(out, shard_images, shard_bytes)
    order = ((s, p) for s, (index, _) in enumerate(sources) for p in range(len(index)))
    try:
        _copy(writer, sources, order, progress, progress_every, sum(len(i) for i, _ in sources))
    except BaseException:
        writer.abort()
        raise
    _finish(writer, out, classes, sizes.pop(), {"merged": {"inputs": len(recs), "keep_labels": keep_labels}})
    return writer.next_key, classes
