"""Atomic, resharding checkpoints of the whole training state (docs/DESIGN.md section 8).

Save (collective over the data-parallel `group`; every rank calls it)::

    path = save_checkpoint(root, step, engine=engine, partition=partition, head_rows={...},
                           head_extra={...}, replicated={...}, keep_last=3, group=group)

checks the free space against the last checkpoint's size (storage.py), writes
``<root>/step_<step>.tmp-<host>-<pid>/`` (DeepSpeed engine under ``engine/``, one head file per
rank, ``replicated.pt`` from rank 0, ``manifest.json`` last), then rank 0 renames it to
``<root>/step_<step>`` and deletes complete checkpoints beyond the newest `keep_last` (folders.py:
it touches only temporary folders it owns). A failed write ends every rank naming the folder and
its free space, and removes the temporary folder. A directory without a valid manifest, a
``.tmp-`` directory or a file of the wrong size is never resumed. Resume (collective)::

    path = resolve_checkpoint(config_resume, root)           # 'auto', a path, or None
    loaded = load_checkpoint(path, engine=engine, partition=partition, group=group,
                             expected_rows={"weight": [512], ...})

Head rows are re-split by class id when the world size changed; DeepSpeed's engine state loads as
`engine.py` says (`LoadedCheckpoint.engine_optimizer_restored` is False when its optimizer was re-initialised).

Every file is loaded with `torch.load(weights_only=True)`; DeepSpeed's own files (which DeepSpeed
loads without that restriction) are scanned with it first. The collectives use
`all_gather_object`/`broadcast_object_list`: with NCCL, call `torch.cuda.set_device` first.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, TypeVar

import torch
import torch.distributed as dist

from largefr.checkpoint.engine import (check_engine_module, engine_entry, engine_share_bytes, load_engine,
                                       save_engine)
from largefr.checkpoint.files import (ENGINE_TAG, HEAD_FILE_PATTERN, REPLICATED_NAME, CheckpointError, file_digest,
                                      head_file_name, list_files, make_manifest, safe_load, save_file,
                                      scan_engine_files, step_dir_name, validate_checkpoint, verify_digests,
                                      write_manifest)
from largefr.checkpoint.folders import (CHECKPOINT_NAMING, Notify, find_latest_checkpoint, last_checkpoint_bytes,
                                        locate_checkpoint, prune, rename_into_place, resolve_checkpoint, temporary_name)
from largefr.checkpoint.reshard import (allocate_rows, check_compatible, load_head_rows, restore_head_rows,
                                        row_schema)
from largefr.checkpoint.storage import check_free_space, describe_write_failure, is_write_failure, tensor_bytes
from largefr.distributed.collectives import group_rank, group_size
from largefr.distributed.partition import ClassPartition

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "find_latest_checkpoint",
           "resolve_checkpoint", "locate_checkpoint", "CHECKPOINT_NAMING", "validate_checkpoint", "load_head_rows"]

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Collective helpers: work identically without torch.distributed (one process)

def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and group_size(group) > 1


def _broadcast_from_first(value: T, group) -> T:
    if not _distributed(group):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return holder[0]


def _all_gather(value: Any, group) -> list[Any]:
    if not _distributed(group):
        return [value]
    gathered: list[Any] = [None] * group_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _raise_together(error: str | None, group) -> None:
    """Every rank raises when any rank failed, so no rank waits in a later collective."""
    gathered = _all_gather(error, group)
    failures = [(rank, e) for rank, e in enumerate(gathered) if e is not None]
    if failures:
        rank, first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise CheckpointError(f"rank {rank}: {first}{more}" if len(gathered) > 1 else first)


def _attempt(action: Callable[[], T]) -> tuple[T | None, str | None]:
    try:
        return action(), None
    except (CheckpointError, OSError) as error:
        return None, str(error)


# ---------------------------------------------------------------------------------------------
# Save

def _check_group(partition: ClassPartition, group) -> None:
    world, rank = group_size(group), group_rank(group)
    if (partition.world_size, partition.rank) != (world, rank):
        raise ValueError(f"partition is rank {partition.rank} of {partition.world_size} but the process group "
                         f"has this process as rank {rank} of {world}")


def _needed_bytes(root: str, estimates: list[int]) -> tuple[int, str]:
    """What the next save needs: the size of the last complete checkpoint, else the ranks' estimates."""
    last = last_checkpoint_bytes(root)
    if last is not None:
        return last[0], f"the size of the last checkpoint, {last[1]}"
    return sum(estimates), "estimated from the tensors to be saved"


def _make_tmp_dir(root: str, step: int, estimate_bytes: int, group) -> str:
    """Rank 0 checks the free space, names and creates the temporary directory and tells the others."""
    estimates = _all_gather(estimate_bytes, group)
    outcome: tuple[str | None, str | None] = (None, None)
    if group_rank(group) == 0:
        def create() -> str:
            tmp = os.path.join(root, temporary_name(step))
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed writer that had the same pid
            os.makedirs(root, exist_ok=True)
            needed, basis = _needed_bytes(root, estimates)
            check_free_space(root, needed, f"checkpoint {step_dir_name(step)}", basis)
            os.makedirs(tmp)
            return tmp
        outcome = _attempt(create)
    tmp, error = _broadcast_from_first(outcome, group)
    if error is not None:
        raise CheckpointError(f"cannot write a checkpoint under {root}: {error}")
    return tmp


def _write_own_files(tmp: str, step: int, partition: ClassPartition, head_rows: Mapping[str, torch.Tensor],
                     head_extra: Mapping[str, Any] | None, replicated: Mapping[str, Any] | None) -> dict[str, Any]:
    """This rank's head file (and on rank 0 replicated.pt); their digests, taken while writing."""
    for name, tensor in head_rows.items():
        if tensor.dim() < 1 or tensor.shape[0] != partition.num_local:
            raise CheckpointError(f"head rows '{name}' have shape {list(tensor.shape)}; dim 0 must be num_local "
                                  f"= {partition.num_local} (classes [{partition.start}, {partition.end}))")
    head = {"num_classes": partition.num_classes, "class_start": partition.start, "class_end": partition.end,
            "world_size": partition.world_size, "rank": partition.rank,
            "rows": {name: t.detach().cpu().contiguous() for name, t in head_rows.items()},  # rows lie in order
            "extra": dict(head_extra or {})}
    name = head_file_name(partition.rank, partition.world_size)
    digests = {name: save_file(head, os.path.join(tmp, name), f"head state of rank {partition.rank}")}
    if partition.rank == 0:
        if replicated is None:
            raise CheckpointError("rank 0 must pass the replicated state")
        digests[REPLICATED_NAME] = save_file({"step": step, **replicated}, os.path.join(tmp, REPLICATED_NAME),
                                             "replicated state")
    return digests


def _digest_share(tmp: str, names: list[str], rank: int, world: int) -> dict[str, Any]:
    """Each rank hashes (and fsyncs) every world-th of the files no rank hashed while writing (DeepSpeed's)."""
    others = [name for name in names if not HEAD_FILE_PATTERN.match(name) and name != REPLICATED_NAME]
    return {name: file_digest(os.path.join(tmp, name)) for i, name in enumerate(others) if i % world == rank}


def save_checkpoint(ckpt_root: str, step: int, *, engine, partition: ClassPartition,
                    head_rows: Mapping[str, torch.Tensor], head_extra: Mapping[str, Any] | None = None,
                    replicated: Mapping[str, Any] | None = None, keep_last: int = 0, group=None,
                    notify: Notify | None = None) -> str:
    """Write the checkpoint of `step` atomically; collective over `group`; returns its directory.

    engine: the DeepSpeed engine (its `save_checkpoint` is called with tag 'engine'); None writes
      no engine state. head_rows: name -> tensor with dim 0 == partition.num_local (W rows, bank
      rows, phi, has_phi, head optimizer per-row state). head_extra: this rank's non-row values
      (RNG states, ...); dropped when resumed at another world size. replicated: state identical
      on all ranks, written by rank 0 (others may pass None). keep_last: complete checkpoints to
      keep (0 = all). Only plain data is accepted (see `files.check_plain`). notify: where rank 0
      names what pruning did to folders it did not write (default: a logging warning).

    Before writing, rank 0 compares the free space with the last checkpoint's size (or, for the first,
    an estimate from the tensors) and refuses, naming both. A write that fails (full disk, quota, I/O
    error) ends every rank with a `CheckpointError` naming the folder and the free space, and the
    temporary folder is removed at once; the previous checkpoint stays the latest complete one.
    """
    _check_group(partition, group)
    rank, world = partition.rank, partition.world_size
    estimate = tensor_bytes(dict(head_rows)) + engine_share_bytes(engine, rank) \
        + (tensor_bytes(replicated or {}) if rank == 0 else 0)
    tmp = _make_tmp_dir(ckpt_root, step, estimate, group)
    try:
        return _write_and_promote(ckpt_root, tmp, step, engine=engine, partition=partition, head_rows=head_rows,
                                  head_extra=head_extra, replicated=replicated, keep_last=keep_last, group=group,
                                  notify=notify or log.warning)
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # every rank has stopped writing: all raise at the same point
        raise


def _write_and_promote(root: str, tmp: str, step: int, *, engine, partition: ClassPartition,
                       head_rows: Mapping[str, torch.Tensor], head_extra: Mapping[str, Any] | None,
                       replicated: Mapping[str, Any] | None, keep_last: int, group, notify: Notify) -> str:
    rank, world = partition.rank, partition.world_size
    what = f"checkpoint {step_dir_name(step)}"
    error = save_engine(engine, tmp, what) if engine is not None else None
    written, own_error = _attempt_write(lambda: _write_own_files(tmp, step, partition, head_rows, head_extra,
                                                                 replicated), tmp, what)
    _raise_together(error or own_error, group)
    _debug_die_mid_save(step, rank)
    names = _broadcast_from_first(list_files(tmp), group)
    digests, error = _attempt_write(lambda: {**written, **_digest_share(tmp, names, rank, world)}, tmp, what)
    gathered = _all_gather((digests, error, row_schema(head_rows)), group)
    failure = next((e for _, e, _ in gathered if e), None)
    if failure is not None:  # every rank holds the same gathered list: all raise alike
        raise CheckpointError(failure)
    outcome = None
    if rank == 0:
        outcome = _finish(root, step, tmp, world, partition.num_classes, gathered, engine, keep_last, notify)
    outcome = _broadcast_from_first(outcome, group)
    if outcome["error"]:
        raise CheckpointError(outcome["error"])
    return outcome["path"]


def _attempt_write(action: Callable[[], T], path: str, what: str) -> tuple[T | None, str | None]:
    """As `_attempt`, and a failed write (full disk, I/O error, torch.save's 'unexpected pos') named."""
    try:
        return action(), None
    except CheckpointError as error:
        return None, str(error)
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not is_write_failure(error):
            raise
        return None, describe_write_failure(error, path, what)


def _debug_die_mid_save(step: int, rank: int) -> None:
    """FAULT INJECTION (tests only): $LARGEFR_DEBUG_KILL_IN_SAVE="STEP:RANK" SIGKILLs that rank mid-save."""
    target = os.environ.get("LARGEFR_DEBUG_KILL_IN_SAVE")
    if target and target == f"{step}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _finish(root: str, step: int, tmp: str, world: int, num_classes: int, gathered: list, engine,
            keep_last: int, notify: Notify) -> dict[str, Any]:
    """Rank 0: manifest (last file), rename into place, prune. Returns the outcome for all ranks."""
    schemas = [schema for _, _, schema in gathered]
    if any(schema != schemas[0] for schema in schemas):
        return {"error": f"head rows differ between ranks (names/widths/dtypes): {schemas}", "path": None}
    files = {name: entry for digests, _, _ in gathered for name, entry in digests.items()}
    final = os.path.join(root, step_dir_name(step))
    try:
        write_manifest(tmp, make_manifest(step=step, world_size=world, num_classes=num_classes,
                                          row_schema=schemas[0], engine=engine_entry(engine, world), files=files))
        rename_into_place(tmp, final, step)
    except OSError as error:
        return {"error": describe_write_failure(error, tmp, f"checkpoint {step_dir_name(step)} (its manifest)"),
                "path": None}
    try:
        prune(root, step, final, keep_last, notify)
    except OSError as error:  # the new checkpoint is complete: a failed clean-up must not fail the run
        notify(f"could not delete old checkpoints under {root}: {error}")
    return {"error": None, "path": final}


# ---------------------------------------------------------------------------------------------
# Load

@dataclass(kw_only=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the engine (which it loads in place)."""

    path: str
    step: int
    head_rows: dict[str, torch.Tensor]
    """Rows of this rank's class range (the destinations passed in, filled), re-split by class id if the
    world size changed."""
    head_extra: dict[str, Any] | None
    """This rank's saved extras; None when the world size changed (they do not map to new ranks)."""
    replicated: dict[str, Any]
    saved_world_size: int
    engine_optimizer_restored: bool
    """False when the engine optimizer was re-initialised from the loaded weights."""


def _read_local(path: str, manifest: Mapping[str, Any], partition: ClassPartition, rows: Mapping[str, torch.Tensor],
                verify: bool, skip_rows: Collection[str]) -> tuple[dict | None, dict]:
    """Verify hashes (this rank's share), scan engine files, fill the head rows, read the replicated state.

    Head files are hashed while their rows are read (`restore_head_rows`); the other files are
    shared out over the ranks and hashed by reading them.
    """
    if verify:
        others = sorted(name for name in manifest["files"] if not HEAD_FILE_PATTERN.match(name))
        rank, world = partition.rank, partition.world_size
        verify_digests(path, manifest, [n for i, n in enumerate(others) if i % world == rank])
    if manifest["engine"] is not None:
        scan_engine_files(os.path.join(path, ENGINE_TAG))
    extra = restore_head_rows(path, manifest, partition, rows, verify=verify, skipped=skip_rows)
    return extra, safe_load(os.path.join(path, REPLICATED_NAME))


def load_checkpoint(path: str, *, engine, partition: ClassPartition, group=None,
                    expected_rows: Mapping[str, Any] | None = None, verify: bool = True,
                    rows: Mapping[str, torch.Tensor] | None = None, skip_rows: Collection[str] = (),
                    fresh_optimizer: bool = False) -> LoadedCheckpoint:
    """Restore the engine in place, fill the head rows and return them with the extras and replicated
    state; collective.

    expected_rows: name -> row width (shape after dim 0) this run uses; a checkpoint with other
    names or widths is refused. verify: compare sha256 digests (each rank hashes a share). rows:
    name -> destination tensor of this rank's class range (the live classifier, optimizer and bank
    tensors), filled in place block by block; None allocates new CPU tensors. skip_rows: saved rows
    not to read (a head optimizer state started afresh). fresh_optimizer: load the engine's module
    weights only. On an error the destinations may be partly overwritten (every rank raises).
    """
    _check_group(partition, group)
    manifest = validate_checkpoint(path)  # same files on every rank: all ranks raise alike
    check_compatible(path, manifest, partition.num_classes, expected_rows)
    destinations = dict(rows) if rows is not None else allocate_rows(manifest, partition)
    result, error = _attempt(lambda: _read_local(path, manifest, partition, destinations, verify, skip_rows))
    _raise_together(error, group)
    extra, replicated = result
    restored = False
    if engine is not None:
        _raise_together(_attempt(lambda: check_engine_module(path, manifest, engine))[1], group)
        restored = load_engine(engine, path, manifest, partition.world_size, fresh_optimizer)
    return LoadedCheckpoint(path=path, step=manifest["step"], head_rows=destinations, head_extra=extra,
                            replicated=replicated, saved_world_size=manifest["world_size"],
                            engine_optimizer_restored=restored)


