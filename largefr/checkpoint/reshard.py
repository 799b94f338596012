"""Head rows by class id across world sizes; offline re-split of a checkpoint; backbone export.

A checkpoint written by W ranks holds one head file per rank with the rows of its class range
(`ClassPartition(num_classes, W, r)`). A run on M ranks reads, for its own range, only the old
files whose ranges overlap it, and stitches the rows together by class id.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Any, Mapping

import torch

from largefr.checkpoint.files import (ENGINE_TAG, REPLICATED_NAME, CheckpointError, file_digest, fsync_dir,
                                      head_file_name, list_files, make_manifest, safe_load, save_file,
                                      scan_engine_files, validate_checkpoint, write_manifest)
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


def read_head_file(path: str, manifest: Mapping[str, Any], old: ClassPartition) -> dict[str, Any]:
    """Load one head file (weights_only, memory-mapped) and check it against the manifest."""
    head = safe_load(path, mmap=True)
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
    return head


def gather_head_rows(path: str, manifest: Mapping[str, Any],
                     partition: ClassPartition) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Rows of classes `partition.start:end` from the overlapping old head files, and this rank's
    old `extra` when the world size is unchanged (None otherwise: per-rank extras do not map)."""
    old_world = manifest["world_size"]
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in manifest["rows"]}
    own_extra = None
    for old_rank, (start, end) in enumerate(ClassPartition(manifest["num_classes"], old_world, 0).all_ranges()):
        lo, hi = max(start, partition.start), min(end, partition.end)
        if lo >= hi:
            continue  # no overlap: the file is not read
        old = ClassPartition(manifest["num_classes"], old_world, old_rank)
        head = read_head_file(os.path.join(path, head_file_name(old_rank, old_world)), manifest, old)
        for name, tensor in head["rows"].items():
            pieces[name].append(tensor[lo - start:hi - start].clone())  # clone: detach from the mmap
        if old_world == partition.world_size and old_rank == partition.rank:
            own_extra = head["extra"]
    return {name: torch.cat(parts) for name, parts in pieces.items()}, own_extra


def load_head_rows(ckpt_dir: str, partition: ClassPartition) -> dict[str, torch.Tensor]:
    """Head rows for classes `partition.start:end` of a complete checkpoint, at any world size."""
    manifest = validate_checkpoint(ckpt_dir)
    check_compatible(ckpt_dir, manifest, partition.num_classes, None)
    return gather_head_rows(ckpt_dir, manifest, partition)[0]


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


def reshard_checkpoint(src: str, dst: str, world_size: int) -> str:
    """Write checkpoint `src` re-split for `world_size` ranks into the new directory `dst`.

    Head rows are re-split by class range (per-rank extras such as RNG states are dropped: they
    have no meaning for other ranks). The replicated state is copied. DeepSpeed's engine files
    are copied when they load at the new world size (ZeRO 0, or the same world size); ZeRO-1/2
    optimizer partitions of another world size are converted with DeepSpeed's universal
    checkpoint converter, which `load_checkpoint` restores at any world size.
    """
    manifest = validate_checkpoint(src)
    if os.path.exists(dst):
        raise CheckpointError(f"output {dst} already exists; choose a new directory")
    tmp = f"{os.path.abspath(dst).rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        for rank in range(world_size):
            partition = ClassPartition(manifest["num_classes"], world_size, rank)
            rows, _ = gather_head_rows(src, manifest, partition)
            head = {"num_classes": partition.num_classes, "class_start": partition.start,
                    "class_end": partition.end, "world_size": world_size, "rank": rank, "rows": rows, "extra": {}}
            save_file(head, os.path.join(tmp, head_file_name(rank, world_size)), f"head rows of rank {rank}")
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


def export_backbone(checkpoint: str, out_path: str, *, prefix: str = "",
                    dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Write the engine's module weights as a plain state_dict loadable with weights_only=True.

    Keys: a leading 'module.' is stripped; with `prefix` only keys under it are kept, prefix
    removed (e.g. 'backbone.' when the engine wraps more than the backbone). Floating tensors are
    cast to `dtype` (None keeps the training dtype; under bf16 these are the bf16 weights).
    """
    validate_checkpoint(checkpoint)
    model_file = os.path.join(checkpoint, ENGINE_TAG, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise CheckpointError(f"checkpoint {checkpoint} has no engine module file {model_file}")
    state = safe_load(model_file, deepspeed_file=True)
    module = state.get("module") if isinstance(state, dict) else None
    if not module:
        raise CheckpointError(f"{model_file}: no 'module' weights (key 'module')")
    weights = _select_keys(module, prefix, model_file)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    save_file(weights, tmp, "backbone state_dict")
    os.replace(tmp, out_path)
    return weights


def _select_keys(module: Mapping[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    weights = {k.removeprefix("module."): v for k, v in module.items()}
    if not prefix:
        return weights
    selected = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not selected:
        sample = sorted(weights)[:5]
        raise CheckpointError(f"{source}: no weight key starts with '{prefix}' (keys start like {sample})")
    return selected
