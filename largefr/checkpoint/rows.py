"""Row tensors moved between checkpoint files and their destinations block by block (docs/DESIGN.md section 8).

A head file is a `torch.save` zip whose tensor storages lie uncompressed at fixed byte offsets.
Loading it with ``map_location="meta"`` (weights_only) reads only its pickle and gives each storage's
offset (`UntypedStorage._checkpoint_offset`, set by torch for meta loads). Rows are then read with
`os.preadv` straight into the destination tensor's memory (CPU), or through one scratch block of at
most `ROW_BLOCK_BYTES` (another device, a file being written, bytes only hashed). Nothing holds a
whole file, a whole tensor copy or a concatenation: the memory beyond the destinations is one block,
and the page cache the reads fill is not part of the process's resident memory (no mapping).

`stream_file` can hash the whole file in the same pass (the bytes between the wanted rows go through
the scratch block), so a rank that reads a file anyway checks its digest without a second read.
"""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from largefr.checkpoint.files import CheckpointError, check_plain, safe_load

ROW_BLOCK_BYTES = 16 << 20
"""Largest piece of rows moved through the scratch block: the restore's and the reshard's memory
beyond the destination tensors (one block)."""


@dataclass(frozen=True)
class RowSpan:
    """Where the rows of one tensor lie in a file: byte offset of row 0, bytes per row, row count."""

    offset: int
    row_bytes: int
    num_rows: int

    def at(self, row: int) -> int:
        """Byte offset of row `row` in the file."""
        return self.offset + row * self.row_bytes

    def byte_range(self, lo: int, hi: int) -> tuple[int, int]:
        return self.at(lo), self.at(hi)


@dataclass(frozen=True)
class TensorSink:
    """Bytes go into `data` (a flat uint8 view of destination rows, on any device)."""

    data: torch.Tensor


@dataclass(frozen=True)
class FileSink:
    """Bytes go into the open file `fd` from byte `offset` on."""

    fd: int
    offset: int


@dataclass(frozen=True)
class Piece:
    """File bytes [start, end) and where they go (None: read only to be hashed)."""

    start: int
    end: int
    sink: TensorSink | FileSink | None


def byte_view(rows: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of contiguous `rows` (no copy)."""
    if not rows.is_contiguous():
        raise ValueError(f"rows of shape {list(rows.shape)} are not contiguous; cannot fill them in place")
    return rows.reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Layout of a file written by torch.save

def load_meta(path: str) -> Any:
    """The file's pickle with every tensor on the meta device (no tensor data read); checks byte order."""
    _check_byte_order(path)
    return safe_load(path, map_location="meta")


def _check_byte_order(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("/byteorder")]
            order = archive.read(names[0]).decode() if names else sys.byteorder
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: not a torch.save zip file ({error}); the file is corrupted") from None
    if order != sys.byteorder:
        raise CheckpointError(f"{path}: written on a {order}-endian machine; this one is {sys.byteorder}-endian")


def row_span(tensor: torch.Tensor, where: str) -> RowSpan:
    """Where the rows of meta tensor `tensor` (from `load_meta`) lie in its file."""
    offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    if offset is None or not tensor.is_meta:
        raise CheckpointError(f"{where}: no storage offset (not loaded with load_meta)")
    if tensor.dim() < 1 or not tensor.is_contiguous():
        raise CheckpointError(f"{where}: rows of shape {list(tensor.shape)} and strides {list(tensor.stride())} are "
                              "not stored contiguously; this file was not written by largefr")
    row_bytes = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
    return RowSpan(offset=offset + tensor.storage_offset() * tensor.element_size(), row_bytes=row_bytes,
                   num_rows=tensor.shape[0])


def read_small(path: str, value: Any) -> Any:
    """`value` (from `load_meta`) with every tensor read from `path`: for small per-rank values only."""
    if isinstance(value, torch.Tensor):
        return _read_tensor(path, value)
    if isinstance(value, dict):
        return type(value)((key, read_small(path, item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(read_small(path, item) for item in value)
    return value


def _read_tensor(path: str, meta: torch.Tensor) -> torch.Tensor:
    storage = meta.untyped_storage()
    data = torch.empty(storage.nbytes(), dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        _pread_exact(fd, memoryview(data.numpy()), storage._checkpoint_offset, path)
    finally:
        os.close(fd)
    return torch.empty(0, dtype=meta.dtype).set_(data.untyped_storage(), meta.storage_offset(), meta.shape,
                                                 meta.stride())


# ---------------------------------------------------------------------------------------------
# Moving bytes

def _pread_exact(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise CheckpointError(f"{path}: ends at byte {offset + done}, {len(buffer) - done} bytes short of the "
                                  "rows its header describes; the file is truncated")
        done += count


def _pwrite_exact(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        done += os.pwrite(fd, buffer[done:], offset + done)


class _Scratch:
    """One reusable CPU block, allocated on first use."""

    def __init__(self, block_bytes: int):
        self.block_bytes = block_bytes
        self._block: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self._block is None:
            self._block = torch.empty(self.block_bytes, dtype=torch.uint8)
        return self._block[:nbytes]


def _move_piece(fd: int, path: str, piece: Piece, scratch: _Scratch, digest) -> None:
    """File bytes of `piece` into its sink, at most one block at a time (hashed when `digest`)."""
    for start in range(piece.start, piece.end, scratch.block_bytes):
        count = min(scratch.block_bytes, piece.end - start)
        at = start - piece.start
        sink = piece.sink
        direct = isinstance(sink, TensorSink) and sink.data.device.type == "cpu"
        block = sink.data[at:at + count] if direct else scratch.take(count)
        buffer = memoryview(block.numpy())
        _pread_exact(fd, buffer, start, path)
        if digest is not None:
            digest.update(buffer)
        if isinstance(sink, FileSink):
            _pwrite_exact(sink.fd, buffer, sink.offset + at)
        elif not direct:
            sink.data[at:at + count].copy_(block)


def _gaps(pieces: list[Piece], size: int) -> list[Piece]:
    """The bytes of a `size`-byte file no piece covers, as pieces without a sink (read to be hashed)."""
    gaps, position = [], 0
    for piece in pieces:
        if piece.start > position:
            gaps.append(Piece(position, piece.start, None))
        position = max(position, piece.end)
    if position < size:
        gaps.append(Piece(position, size, None))
    return gaps


def stream_file(path: str, pieces: Iterable[Piece], *, hash_all: bool = False,
                block_bytes: int = ROW_BLOCK_BYTES) -> str | None:
    """Move `pieces` of file `path` into their sinks; with `hash_all`, read the whole file in order in
    the same pass and return its sha256 (hex), else read only the pieces and return None."""
    ordered = sorted((piece for piece in pieces if piece.end > piece.start), key=lambda piece: piece.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise CheckpointError(f"{path}: two row tensors share bytes [{after.start}, {before.end}); "
                                  "this file was not written by largefr")
    scratch = _Scratch(block_bytes)
    digest = hashlib.sha256() if hash_all else None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        gaps = _gaps(ordered, size) if hash_all else []
        for piece in sorted(ordered + gaps, key=lambda piece: piece.start):
            if piece.sink is None:
                _hash_gap(fd, path, piece, scratch, digest)
            else:
                _move_piece(fd, path, piece, scratch, digest)
    finally:
        os.close(fd)
    return digest.hexdigest() if digest is not None else None


def _hash_gap(fd: int, path: str, gap: Piece, scratch: _Scratch, digest) -> None:
    for start in range(gap.start, gap.end, scratch.block_bytes):
        buffer = memoryview(scratch.take(min(scratch.block_bytes, gap.end - start)).numpy())
        _pread_exact(fd, buffer, start, path)
        digest.update(buffer)


# ---------------------------------------------------------------------------------------------
# Writing a file whose rows are filled afterwards

def write_placeholder(obj: Mapping[str, Any], path: str, rows: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      where: str) -> dict[str, RowSpan]:
    """`torch.save` `obj` with `obj['rows']` = tensors of the given shapes and dtypes whose bytes are left
    as space (torch's skip_data); returns where each one's rows are, to be filled with `FileSink`s.
    Nothing of the rows' size is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    check_plain(obj, where)
    with FakeTensorMode():
        fake = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in rows.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({**obj, "rows": fake}, path)  # to a path: torch seeks over the rows (fsync: the caller's)
    meta = load_meta(path)
    return {name: row_span(tensor, f"{path}: rows '{name}'") for name, tensor in meta["rows"].items()}
