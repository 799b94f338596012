"""Head rows by class id across world sizes; offline re-split of a checkpoint (backbone export: backbone.py).

A checkpoint written by W ranks holds one head file per rank with the rows of its class range
(`ClassPartition(num_classes, W, r)`). A run on M ranks reads, for its own range, only the old
files whose ranges overlap it, and copies their rows block by block into its destination tensors
at their class ids (`largefr.checkpoint.rows`).
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import torch

from largefr.checkpoint.files import (ENGINE_TAG, REPLICATED_NAME, CheckpointError, check_digest, file_digest,
                                      fsync_dir, head_file_name, list_files, make_manifest, safe_load,
                                      scan_engine_files, validate_checkpoint, verify_digests, write_manifest)
from largefr.checkpoint.rows import (ROW_BLOCK_BYTES, FileSink, Piece, RowSpan, TensorSink, byte_view, load_meta,
                                     read_small, row_span, stream_file, write_placeholder)
from largefr.distributed.partition import ClassPartition

HEAD_KEYS = ("num_classes", "class_start", "class_end", "world_size", "rank", "rows", "extra")


def row_schema(rows: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per row name: the shape after dim 0 (the row width) and the dtype; identical on every rank."""
    return {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(rows.items())}


def check_compatible(path: str, manifest: Mapping[str, Any], num_classes: int,
                     expected_rows: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint of another class count or row width, naming both values."""
    if manifest["num_classes"] != num_classes:
        raise CheckpointError(
            f"checkpoint {path} was written for num_classes={manifest['num_classes']} but this run has "
            f"num_classes={num_classes}: head rows cannot be mapped; use a checkpoint of the same data set")
    if expected_rows is None:
        return
    saved = manifest["rows"]
    if set(saved) != set(expected_rows):
        raise CheckpointError(f"checkpoint {path} holds head rows {sorted(saved)} but this run expects "
                              f"{sorted(expected_rows)}")
    for name, shape in expected_rows.items():
        if list(saved[name]["shape"]) != list(shape):
            raise CheckpointError(
                f"checkpoint {path}: head rows '{name}' have width {saved[name]['shape']} but this run expects "
                f"{list(shape)} (embedding size differs?); use a checkpoint of the same model")


def read_head_layout(path: str, manifest: Mapping[str, Any],
                     old: ClassPartition) -> tuple[dict[str, Any], dict[str, RowSpan]]:
    """The pickle of one head file (tensors on the meta device: no row is read), checked against the
    manifest, and where each row tensor's rows lie in the file."""
    head = load_meta(path)
    missing = [key for key in HEAD_KEYS if not isinstance(head, dict) or key not in head]
    if missing:
        raise CheckpointError(f"{path}: head file lacks keys {missing}")
    expected = {"num_classes": old.num_classes, "world_size": old.world_size, "rank": old.rank,
                "class_start": old.start, "class_end": old.end}
    for key, value in expected.items():
        if head[key] != value:
            raise CheckpointError(f"{path}: key '{key}' is {head[key]}, expected {value} from the manifest")
    schema = row_schema(head["rows"])
    if schema != manifest["rows"]:
        raise CheckpointError(f"{path}: rows {schema} differ from the manifest's {manifest['rows']}")
    for name, tensor in head["rows"].items():
        if tensor.shape[0] != old.num_local:
            raise CheckpointError(f"{path}: rows '{name}' have {tensor.shape[0]} rows, the class range "
                                  f"[{old.start}, {old.end}) has {old.num_local}")
    return head, {name: row_span(tensor, f"{path}: rows '{name}'") for name, tensor in head["rows"].items()}


@dataclass(frozen=True)
class Overlap:
    """Rows [src_lo, src_hi) of old rank `old_rank`'s head file are destination rows from `dst_lo` on."""

    old_rank: int
    src_lo: int
    src_hi: int
    dst_lo: int


def overlaps(num_classes: int, old_world: int, new: ClassPartition) -> list[Overlap]:
    """The old head files that hold classes of `new`'s range, and which of their rows go where."""
    found = []
    for old_rank, (start, end) in enumerate(ClassPartition(num_classes, old_world, 0).all_ranges()):
        lo, hi = max(start, new.start), min(end, new.end)
        if lo < hi:
            found.append(Overlap(old_rank, lo - start, hi - start, lo - new.start))
    return found


def head_file_hashers(num_classes: int, old_world: int, new_world: int) -> dict[int, int]:
    """Old rank -> the new rank that hashes its head file while reading it: the one that needs most of
    its rows (it reads the rest of the file only to hash it)."""
    best: dict[int, tuple[int, int]] = {}
    for new_rank in range(new_world):
        for overlap in overlaps(num_classes, old_world, ClassPartition(num_classes, new_world, new_rank)):
            rows = overlap.src_hi - overlap.src_lo
            if rows > best.get(overlap.old_rank, (-1, 0))[0]:
                best[overlap.old_rank] = (rows, new_rank)
    return {old_rank: new_rank for old_rank, (_, new_rank) in best.items()}


def allocate_rows(manifest: Mapping[str, Any], partition: ClassPartition) -> dict[str, torch.Tensor]:
    """Empty CPU tensors for the rows of `partition`'s class range, as the manifest describes them."""
    return {name: torch.empty((partition.num_local, *entry["shape"]), dtype=getattr(torch, entry["dtype"]))
            for name, entry in manifest["rows"].items()}


def check_destinations(path: str, manifest: Mapping[str, Any], partition: ClassPartition,
                       destinations: Mapping[str, torch.Tensor], skipped: Collection[str] = ()) -> None:
    """Refuse destination tensors that do not match the saved rows (less `skipped`) by name, shape or dtype."""
    saved = {name: entry for name, entry in manifest["rows"].items() if name not in skipped}
    if set(saved) != set(destinations):
        raise CheckpointError(f"checkpoint {path} holds head rows {sorted(saved)} but this run restores "
                              f"{sorted(destinations)}; resume with the settings it was written with")
    for name, tensor in destinations.items():
        shape = [partition.num_local, *saved[name]["shape"]]
        dtype = saved[name]["dtype"]
        if list(tensor.shape) != shape or str(tensor.dtype).removeprefix("torch.") != dtype:
            raise CheckpointError(f"checkpoint {path}: head rows '{name}' are {dtype} of shape {shape} for classes "
                                  f"[{partition.start}, {partition.end}); this run has {tensor.dtype} of shape "
                                  f"{list(tensor.shape)} (embedding size or dtype differs?)")
        if not tensor.is_contiguous():
            raise ValueError(f"destination rows '{name}' must be contiguous to be filled in place")


def restore_head_rows(path: str, manifest: Mapping[str, Any], partition: ClassPartition,
                      destinations: Mapping[str, torch.Tensor], *, verify: bool = False,
                      block_bytes: int = ROW_BLOCK_BYTES, skipped: Collection[str] = ()) -> dict[str, Any] | None:
    """Fill `destinations` (name -> this rank's rows) from the overlapping old head files, block by block.

    Returns this rank's old per-rank `extra` when the world size is unchanged (None otherwise: per-rank
    extras do not map). With `verify`, the head files `head_file_hashers` gives this rank are read whole
    in the same pass and their sha256 compared with the manifest. Saved rows named in `skipped` are not read.
    """
    check_destinations(path, manifest, partition, destinations, skipped)
    old_world, num_classes = manifest["world_size"], manifest["num_classes"]
    hashers = head_file_hashers(num_classes, old_world, partition.world_size) if verify else {}
    own_extra = None
    for overlap in overlaps(num_classes, old_world, partition):
        name = head_file_name(overlap.old_rank, old_world)
        file_path = os.path.join(path, name)
        head, spans = read_head_layout(file_path, manifest, ClassPartition(num_classes, old_world, overlap.old_rank))
        pieces = [_piece(spans[row], overlap, destinations[row]) for row in destinations]
        digest = stream_file(file_path, pieces, hash_all=hashers.get(overlap.old_rank) == partition.rank,
                             block_bytes=block_bytes)
        if digest is not None:
            check_digest(path, manifest, name, digest)
        if old_world == partition.world_size and overlap.old_rank == partition.rank:
            own_extra = read_small(file_path, head["extra"])
    for rows in destinations.values():  # written behind torch's back: counted as in-place writes (`_version`)
        torch.autograd.graph.increment_version(rows)
    return own_extra


def _piece(span: RowSpan, overlap: Overlap, destination: torch.Tensor) -> Piece:
    start, end = span.byte_range(overlap.src_lo, overlap.src_hi)
    rows = destination[overlap.dst_lo:overlap.dst_lo + overlap.src_hi - overlap.src_lo]
    return Piece(start, end, TensorSink(byte_view(rows)))


def load_head_rows(ckpt_dir: str, partition: ClassPartition) -> dict[str, torch.Tensor]:
    """Head rows for classes `partition.start:end` of a complete checkpoint, at any world size (new tensors)."""
    manifest = validate_checkpoint(ckpt_dir)
    check_compatible(ckpt_dir, manifest, partition.num_classes, None)
    rows = allocate_rows(manifest, partition)
    restore_head_rows(ckpt_dir, manifest, partition, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Offline tools

def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)  # checkpoints are never modified in place: a hard link is a free copy
    except OSError:
        shutil.copy2(src, dst)


def _convert_engine_to_universal(src_engine: str, dst_engine: str) -> None:
    """DeepSpeed's own ZeRO -> universal conversion (optimizer state loadable at any world size)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=src_engine, output_folder=dst_engine, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    stray = os.path.join(os.path.dirname(dst_engine), "latest_universal")  # we always pass the tag
    if os.path.exists(stray):
        os.remove(stray)


def _write_engine(src: str, dst: str, engine: Mapping[str, Any] | None, world_size: int) -> dict | None:
    """Engine files for `world_size` ranks: copied when still valid, converted to universal otherwise."""
    if engine is None:
        return None
    src_engine, dst_engine = os.path.join(src, ENGINE_TAG), os.path.join(dst, ENGINE_TAG)
    scan_engine_files(src_engine)  # DeepSpeed's converter unpickles without restriction
    partitioned = engine["format"] == "native" and engine["zero_stage"] > 0
    if partitioned and engine["world_size"] != world_size:
        _convert_engine_to_universal(src_engine, dst_engine)
        return {**engine, "format": "universal"}
    for relpath in list_files(src_engine):
        _link_or_copy(os.path.join(src_engine, relpath), os.path.join(dst_engine, relpath))
    return dict(engine)


def reshard_checkpoint(src: str, dst: str, world_size: int, *, log: Callable[[str], None] | None = None,
                       block_bytes: int = ROW_BLOCK_BYTES) -> str:
    """Write checkpoint `src` re-split for `world_size` ranks into the new directory `dst`.

    Head rows are re-split by class range without holding any file: every new head file is written
    with its rows left as space, then each old head file is read once, in order, hashed (checked
    against the manifest) and its rows written into the new files, one block at a time. Per-rank
    extras such as RNG states are dropped (they have no meaning for other ranks). The replicated
    state is checked and copied. DeepSpeed's engine files are copied when they load at the new world
    size (ZeRO 0, or the same world size); ZeRO-1/2 optimizer partitions of another world size are
    converted with DeepSpeed's universal checkpoint converter, which `load_checkpoint` restores at
    any world size. `log` receives a progress line per old head file.
    """
    manifest = validate_checkpoint(src)
    if os.path.exists(dst):
        raise CheckpointError(f"output {dst} already exists; choose a new directory")
    tmp = f"{os.path.abspath(dst).rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        _reshard_head_files(src, tmp, manifest, world_size, log or (lambda line: None), block_bytes)
        others = [name for name in manifest["files"] if not name.startswith("head_rank")]
        verify_digests(src, manifest, others)
        safe_load(os.path.join(src, REPLICATED_NAME))  # refuse unsafe content before copying it on
        _link_or_copy(os.path.join(src, REPLICATED_NAME), os.path.join(tmp, REPLICATED_NAME))
        engine = _write_engine(src, tmp, manifest["engine"], world_size)
        files = {relpath: file_digest(os.path.join(tmp, relpath)) for relpath in list_files(tmp)}
        write_manifest(tmp, make_manifest(step=manifest["step"], world_size=world_size,
                                          num_classes=manifest["num_classes"], row_schema=manifest["rows"],
                                          engine=engine, files=files))
        os.rename(tmp, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _reshard_head_files(src: str, tmp: str, manifest: Mapping[str, Any], world_size: int,
                        log: Callable[[str], None], block_bytes: int) -> None:
    num_classes, old_world = manifest["num_classes"], manifest["world_size"]
    new_parts = [ClassPartition(num_classes, world_size, rank) for rank in range(world_size)]
    spans = {part.rank: _placeholder_head_file(tmp, manifest, part) for part in new_parts}
    fds = {part.rank: os.open(os.path.join(tmp, head_file_name(part.rank, world_size)), os.O_WRONLY)
           for part in new_parts}
    try:
        for old_rank in range(old_world):
            name = head_file_name(old_rank, old_world)
            path = os.path.join(src, name)
            _, old_spans = read_head_layout(path, manifest, ClassPartition(num_classes, old_world, old_rank))
            pieces = [Piece(*span.byte_range(overlap.src_lo, overlap.src_hi),
                            FileSink(fds[part.rank], spans[part.rank][row].at(overlap.dst_lo)))
                      for part in new_parts for overlap in overlaps(num_classes, old_world, part)
                      if overlap.old_rank == old_rank for row, span in old_spans.items()]
            check_digest(src, manifest, name, stream_file(path, pieces, hash_all=True, block_bytes=block_bytes))
            log(f"read {name} ({os.path.getsize(path) / 2**20:.1f} MiB, sha256 checked) into "
                f"{len({piece.sink.fd for piece in pieces})} new head file(s)")
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)


def _placeholder_head_file(tmp: str, manifest: Mapping[str, Any], part: ClassPartition) -> dict[str, RowSpan]:
    header = {"num_classes": part.num_classes, "class_start": part.start, "class_end": part.end,
              "world_size": part.world_size, "rank": part.rank, "extra": {}}
    shapes = {name: ((part.num_local, *entry["shape"]), getattr(torch, entry["dtype"]))
              for name, entry in manifest["rows"].items()}
    return write_placeholder(header, os.path.join(tmp, head_file_name(part.rank, part.world_size)), shapes,
                             f"head rows of rank {part.rank}")
