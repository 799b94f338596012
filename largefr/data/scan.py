"""Vectorised scan of one .rec: its index and every image record's frame and payload header, in numpy.

The `.idx` is parsed in chunks with numpy's text reader; the records' first bytes are gathered from
the memory-mapped .rec in chunks of `CHUNK_RECORDS` records, so the memory is the kept arrays (int64
keys, offsets, labels, one uint8 problem code each) plus a chunk, not Python objects per record. A
record whose frame is split into parts (a payload holding the magic word, ~2^-32 per word) is read
in full by recordio's reader. The scan never stops at a bad record: each gets a problem code, and the
callers decide (the loaders' index refuses broken frames and applies data.on_bad_image to records
that are not images; tools/rec.py verify lists them all).
"""
from __future__ import annotations

import mmap
import re
from dataclasses import dataclass

import numpy as np

from largefr.data.recordio import (IR_HEADER_SIZE, RECORDIO_MAGIC, RecordFile, RecordIOError, first_label,
                                   read_index, unpack_header)

CHUNK_RECORDS = 1 << 14
"""Records whose first bytes are gathered at once (their index arithmetic takes about 15 MB)."""
_IDX_CHUNK_BYTES = 1 << 24
_LENGTH_MASK = (1 << 29) - 1
_HEAD_BYTES = 8 + IR_HEADER_SIZE + 8  # frame, payload header, two float labels
_IMAGE_HEAD = 12
_BLANK_LINE = re.compile(rb"(?m)^[ \t\r]*$")

OK, NOT_IMAGE, PAST_END, BAD_MAGIC, TRUNCATED, BAD_HEADER, NOT_INTEGER, BAD_PARTS = range(8)
PROBLEMS = {
    NOT_IMAGE: "the payload does not start like an image (JPEG, PNG, BMP, WebP, TIFF, JPEG 2000, PNM)",
    PAST_END: "the index offset is past the end of the .rec",
    BAD_MAGIC: "wrong magic (not 0xced7230a): the .idx does not match the .rec or the file is corrupt",
    TRUNCATED: "the record's length runs past the end of the .rec: the file is truncated",
    BAD_HEADER: "the payload is too short for its header and labels",
    NOT_INTEGER: "the label is not an integer class id",
    BAD_PARTS: "a multi-part record whose parts are broken",
}
"""What each problem code means (OK = 0 is a usable image record)."""
PROBLEM_KINDS = {NOT_IMAGE: "not_image", PAST_END: "past_end", BAD_MAGIC: "bad_magic", TRUNCATED: "truncated",
                 BAD_HEADER: "bad_header", NOT_INTEGER: "label_not_integer", BAD_PARTS: "bad_parts"}
"""A short name of each problem code (reports count them by it)."""

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
               b"\x00\x00\x00\x0cjP  \r\n"[:_IMAGE_HEAD], b"\xffO\xffQ", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
FORMAT_NAMES = ("jpeg", "png", "bmp", "tiff", "tiff", "jpeg2000", "jpeg2000", "pnm", "pnm", "pnm", "pnm", "pnm",
                "pnm", "webp")
"""Format of each signature index of `image_formats` (the last one is RIFF....WEBP)."""


@dataclass
class FileScan:
    """Every indexed record of one .rec, in offset order, with its class label and problem code."""

    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    problems: np.ndarray
    """uint8 problem code per record (OK = 0); see PROBLEMS."""
    header_layout: bool
    """Record 0 is insightface's header: only keys 1 .. label[0]-1 are images (the others are left out)."""


def read_index_arrays(path_idx: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) int64 of a `key\\toffset` index; malformed lines are errors naming the line."""
    with open(path_idx, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(_IDX_CHUNK_BYTES), b"")) + 1
        f.seek(0)
        keys, offsets, filled, tail = np.empty(lines, np.int64), np.empty(lines, np.int64), 0, b""
        for chunk in iter(lambda: f.read(_IDX_CHUNK_BYTES), b""):
            text, _, tail = (tail + chunk).rpartition(b"\n")
            filled = _parse_into(keys, offsets, filled, text, path_idx)
        filled = _parse_into(keys, offsets, filled, tail, path_idx)
    keys, offsets = keys[:filled], offsets[:filled]
    if (keys < 0).any() or (offsets < 0).any():
        read_index(path_idx)  # names the line
    return keys, offsets


def _parse_into(keys: np.ndarray, offsets: np.ndarray, filled: int, text: bytes, path_idx: str) -> int:
    if not text.strip():
        return filled
    parsed = np.fromstring(text.decode("ascii", "replace"), dtype=np.int64, sep=" ")
    if parsed.size != 2 * _line_count(text):  # a malformed line stops numpy's reader early
        read_index(path_idx)  # the line-by-line reader names the malformed line
        raise RecordIOError(f"{path_idx}: not a 'key<TAB>offset' index")
    count = parsed.size // 2
    keys[filled:filled + count] = parsed[0::2]
    offsets[filled:filled + count] = parsed[1::2]
    return filled + count


def _line_count(text: bytes) -> int:
    """Non-empty lines of `text` (a blank line between entries is allowed, as read_index allows it)."""
    return text.count(b"\n") + 1 - len(_BLANK_LINE.findall(text))


def _check_unique(keys: np.ndarray, offsets: np.ndarray, path_idx: str) -> None:
    ordered = np.sort(keys)
    repeated = ordered[1:] == ordered[:-1]
    del ordered
    if repeated.any():
        order = np.argsort(keys, kind="stable")
        dup = np.flatnonzero(np.diff(keys[order]) == 0)
        i, j = order[dup[0]], order[dup[0] + 1]
        raise RecordIOError(f"{path_idx}: duplicate key {int(keys[i])} (offsets {int(offsets[i])} and "
                            f"{int(offsets[j])}): the index is corrupt; rebuild it")


def _image_selection(file: RecordFile, keys: np.ndarray, offsets: np.ndarray, path_idx: str) -> np.ndarray | None:
    """Mask of image keys when record 0 is insightface's header, else None (every key is an image)."""
    zero = np.flatnonzero(keys == 0)
    if not zero.size or int(offsets[zero[0]]) + 8 > file.file_size:
        return None
    flag, label, _, _, image = unpack_header(file.read_at(int(offsets[zero[0]]), 0))
    if flag == 0 or image:  # an image record 0 (RecBuilder's layout, im2rec's), not a header
        return None
    end = int(label[0])
    mask = (keys >= 1) & (keys < end)
    found = int(mask.sum())
    if found != end - 1:
        present = np.sort(keys[mask])
        missing = int(np.flatnonzero(present != np.arange(1, 1 + found))[:1].tolist()[0] + 1) if found else 1
        raise RecordIOError(f"{path_idx}: image key {missing} (of {end - 1 - found} missing) is absent; header "
                            f"record 0 of {file.path_rec} declares images 1..{end - 1}; rebuild the index or "
                            "re-pack the data")
    return mask


def _gather(buffer: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """len(starts) x width bytes from `buffer` at `starts` (bytes past its end read as 0)."""
    safe = np.clip(starts, 0, max(buffer.size - width, 0))
    rows = buffer[safe[:, None] + np.arange(min(width, buffer.size), dtype=np.int64)]
    if rows.shape[1] < width:
        rows = np.pad(rows, ((0, 0), (0, width - rows.shape[1])))
    for i in np.flatnonzero(safe != starts):  # rows reaching past the end (the last records): bytes there read as 0
        start = int(starts[i])
        rows[i] = 0
        tail = buffer[start:min(start + width, buffer.size)] if start < buffer.size else buffer[:0]
        rows[i, :tail.size] = tail
    return rows


def image_formats(heads: np.ndarray) -> np.ndarray:
    """Index into FORMAT_NAMES of each row's image signature, -1 where none matches."""
    found = np.full(len(heads), -1, np.int16)
    for number, signature in enumerate(_SIGNATURES):
        sig = np.frombuffer(signature, np.uint8)
        match = (heads[:, :sig.size] == sig).all(axis=1) & (found < 0)
        found[match] = number
    webp = (heads[:, :4] == np.frombuffer(b"RIFF", np.uint8)).all(axis=1) & \
        (heads[:, 8:12] == np.frombuffer(b"WEBP", np.uint8)).all(axis=1)
    found[webp & (found < 0)] = len(_SIGNATURES)
    return found


def _scan_chunk(buffer: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels float64, problems) of the records at `offsets` (BAD_PARTS: a multi-part frame, read in full)."""
    head = _gather(buffer, offsets, _HEAD_BYTES)
    words = head[:, :16].copy().view("<u4")  # magic, lrec, flag, label
    magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2].astype(np.int64)
    length = (lrec & _LENGTH_MASK).astype(np.int64)
    label = words[:, 3].copy().view("<f4").astype(np.float64)
    first_vector_label = head[:, 8 + IR_HEADER_SIZE:12 + IR_HEADER_SIZE].copy().view("<f4")[:, 0]
    label = np.where(flag > 0, first_vector_label.astype(np.float64), label)
    problems = np.zeros(len(offsets), np.uint8)
    problems[(length < IR_HEADER_SIZE + 4 * np.minimum(flag, 1 << 20))] = BAD_HEADER
    problems[offsets + 8 + length > size] = TRUNCATED
    problems[(lrec >> 29) != 0] = BAD_PARTS  # resolved by a full read in scan_file
    problems[magic != RECORDIO_MAGIC] = BAD_MAGIC
    problems[offsets + 8 > size] = PAST_END
    image_start = offsets + 8 + IR_HEADER_SIZE + 4 * np.minimum(flag, 1 << 20)
    usable = problems == OK
    problems[usable & ((label != np.rint(label)) | (np.abs(label) > 2**31))] = NOT_INTEGER
    heads = _gather(buffer, image_start, _IMAGE_HEAD)
    short = image_start + _IMAGE_HEAD > offsets + 8 + length  # tiny payloads: compare only their bytes
    heads[short] = _gather_bounded(buffer, image_start[short], offsets[short] + 8 + length[short])
    problems[(problems == OK) & (image_formats(heads) < 0)] = NOT_IMAGE
    return label, problems


def _gather_bounded(buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    out = _gather(buffer, starts, _IMAGE_HEAD)
    out[starts[:, None] + np.arange(_IMAGE_HEAD) >= ends[:, None]] = 0
    return out


def _multipart(file: RecordFile, key: int, offset: int) -> tuple[float, int]:
    """(label, problem) of a record read in full (multi-part frames)."""
    try:
        _, label, _, _, image = unpack_header(file.read_at(offset, key))
    except RecordIOError:
        return 0.0, BAD_PARTS
    value = first_label(label)
    if not float(value).is_integer():  # NaN and infinities included
        return 0.0, NOT_INTEGER
    heads = np.frombuffer(image[:_IMAGE_HEAD].ljust(_IMAGE_HEAD, b"\0"), np.uint8)[None]
    return value, OK if image_formats(heads)[0] >= 0 else NOT_IMAGE


def scan_file(path_rec: str, path_idx: str, progress=None) -> FileScan:
    """Scan every image record of one .rec (see the module docstring); `progress(done, total)` per chunk."""
    keys, offsets = read_index_arrays(path_idx)
    _check_unique(keys, offsets, path_idx)
    file = RecordFile(path_rec)
    try:
        mask = _image_selection(file, keys, offsets, path_idx)
        header_layout = mask is not None
        if header_layout:
            keys, offsets = keys[mask], offsets[mask]
        del mask
        if not (offsets[1:] >= offsets[:-1]).all():  # written in key order, not file order: sort (a copy)
            order = np.argsort(offsets, kind="stable")
            keys = keys[order]
            offsets = offsets[order]
            del order
        _check_distinct_offsets(keys, offsets, path_idx)
        labels, problems = _scan_records(file, keys, offsets, progress)
    finally:
        file.close()
    return FileScan(keys=keys, offsets=offsets, labels=labels, problems=problems, header_layout=header_layout)


def _check_distinct_offsets(keys: np.ndarray, offsets: np.ndarray, path_idx: str) -> None:
    shared = np.flatnonzero(np.diff(offsets) == 0)
    if shared.size:
        i = int(shared[0])
        raise RecordIOError(f"{path_idx}: keys {int(keys[i])} and {int(keys[i + 1])} both point at offset "
                            f"{int(offsets[i])}; the index is corrupt, rebuild it")


def _release(mm: mmap.mmap, offsets: np.ndarray) -> None:
    """Unmap the pages of a scanned chunk (file pages stay cached by the OS): the scan's resident memory
    stays the arrays it keeps, not the size of the .rec. Offsets are sorted, so the chunk is one range."""
    start = int(offsets[0]) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(int(offsets[-1]) + _HEAD_BYTES + _IMAGE_HEAD + 4096, len(mm))
    if hasattr(mm, "madvise") and end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _scan_records(file: RecordFile, keys: np.ndarray, offsets: np.ndarray, progress) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(len(keys), np.int64)
    problems = np.zeros(len(keys), np.uint8)
    if file.file_size == 0:
        problems[:] = PAST_END
        return labels, problems
    with open(file.path_rec, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buffer = np.frombuffer(mm, np.uint8)
        try:
            for start in range(0, len(keys), CHUNK_RECORDS):
                part = slice(start, start + CHUNK_RECORDS)
                chunk_labels, chunk_problems = _scan_chunk(buffer, offsets[part], file.file_size)
                for i in np.flatnonzero(chunk_problems == BAD_PARTS):
                    chunk_labels[i], chunk_problems[i] = _multipart(file, int(keys[part][i]), int(offsets[part][i]))
                labels[part] = np.where(chunk_problems == OK, chunk_labels, 0).astype(np.int64)
                problems[part] = chunk_problems
                _release(mm, offsets[part])
                if progress is not None:
                    progress(min(start + CHUNK_RECORDS, len(keys)), len(keys))
        finally:
            del buffer
    return labels, problems
