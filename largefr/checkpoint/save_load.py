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

Head rows are re-split by class id when the world size changed. DeepSpeed's engine state (checked
with DeepSpeed 0.19.8): the module weights load at any world size and ZeRO stage. The engine
optimizer state loads with the same ZeRO stage when the world size is unchanged, for ZeRO 0 at
any world size (it is not partitioned), and for ZeRO 1/2 at any world size once
`tools/reshard_checkpoint.py` converted the partitions to DeepSpeed's universal format (DeepSpeed
refuses native ZeRO partitions of another world size). Otherwise the engine optimizer is
re-initialised from the loaded weights, with a warning saying why
(`LoadedCheckpoint.engine_optimizer_restored` is False).

Every file is loaded with `torch.load(weights_only=True)`; DeepSpeed's own files (which DeepSpeed
loads without that restriction) are scanned with it first. The collectives use
`all_gather_object`/`broadcast_object_list`: with NCCL, call `torch.cuda.set_device` first.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from largefr.checkpoint.files import (ENGINE_TAG, HEAD_FILE_PATTERN, REPLICATED_NAME, CheckpointError, check_shapes,
                                      file_digest,
                                      head_file_name, list_files, make_manifest,
                                      safe_load, save_file, scan_engine_files, step_dir_name,
                                      validate_checkpoint, verify_digests, write_manifest)
from largefr.checkpoint.folders import (CHECKPOINT_NAMING, Notify, find_latest_checkpoint, last_checkpoint_bytes,
                                        locate_checkpoint, prune, rename_into_place, resolve_checkpoint, temporary_name)
from largefr.checkpoint.reshard import (allocate_rows, check_compatible, load_head_rows, restore_head_rows,
                                        row_schema)
from largefr.checkpoint.storage import (check_free_space, describe_write_failure, is_write_failure,
                                        tensor_bytes)
from largefr.distributed.collectives import group_rank, group_size
from largefr.distributed.partition import ClassPartition

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "find_latest_checkpoint",
           "resolve_checkpoint", "locate_checkpoint", "CHECKPOINT_NAMING", "validate_checkpoint", "load_head_rows",
           "capture_rng_state", "restore_rng_state",
           "capture_generator_state", "restore_generator_state", "reseed_value"]

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


def _engine_entry(engine, world: int) -> dict[str, Any] | None:
    if engine is None:
        return None
    return {"tag": ENGINE_TAG, "format": "native", "world_size": world, "zero_stage": _zero_stage(engine)}


def engine_share_bytes(engine, rank: int) -> int:
    """About the bytes this rank writes of DeepSpeed's checkpoint, counted from the live state: the module
    (data-parallel rank 0) and the optimizer's state and master partitions (ZeRO: every rank its own)."""
    if engine is None:
        return 0
    module = tensor_bytes(dict(engine.module.state_dict())) if rank == 0 else 0
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    if optimizer is None or (_zero_stage(engine) == 0 and rank != 0):
        return module
    masters = [p for g in optimizer.param_groups for p in g["params"]] if _zero_stage(engine) > 0 else []
    return module + tensor_bytes(list(optimizer.state.values())) + tensor_bytes(masters)


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
    error = _save_engine(engine, tmp, what) if engine is not None else None
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


def _save_engine(engine, tmp: str, what: str) -> str | None:
    """DeepSpeed's part of the checkpoint; the named write failure, or None.

    A rank whose write fails (DeepSpeed 0.19.8, ZeRO 0-2: in `torch.save`, between the collectives) skips
    the barrier that ends DeepSpeed's `save_checkpoint`, in which the other ranks wait: it takes that
    barrier here, so that every rank reaches the error exchange that follows together.
    """
    try:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, client_state={}, save_latest=False)
        return None
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not is_write_failure(error):
            raise
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return describe_write_failure(error, os.path.join(tmp, ENGINE_TAG), f"{what} (DeepSpeed's engine files)")


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
                                          row_schema=schemas[0], engine=_engine_entry(engine, world), files=files))
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
        _raise_together(_attempt(lambda: _check_engine_module(path, manifest, engine))[1], group)
        restored = _load_engine(engine, path, manifest, partition.world_size, fresh_optimizer)
    return LoadedCheckpoint(path=path, step=manifest["step"], head_rows=destinations, head_extra=extra,
                            replicated=replicated, saved_world_size=manifest["world_size"],
                            engine_optimizer_restored=restored)


ENGINE_MODULE_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the module weights (native format; key 'module')."""


def _check_engine_module(path: str, manifest: Mapping[str, Any], engine) -> None:
    """The saved module weights against the live module's names and shapes, before DeepSpeed loads them
    (its own error is a raw state_dict size mismatch naming no file)."""
    file = os.path.join(path, ENGINE_TAG, ENGINE_MODULE_FILE)
    if manifest["engine"]["format"] != "native" or not os.path.isfile(file):
        return
    saved = safe_load(file, deepspeed_file=True, mmap=True)
    check_shapes(file, "module", saved.get("module") if isinstance(saved, dict) else None,
                 engine.module.state_dict(), "the file was written for another model or was modified; resume with "
                 "the model it was written with or an earlier checkpoint")


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def _engine_mismatch(saved: Mapping[str, Any], stage: int, world: int) -> str | None:
    """Why the saved engine optimizer state cannot be loaded into this engine, or None if it can."""
    if saved["format"] == "universal":
        return None if stage > 0 else "it is in DeepSpeed's universal format, which ZeRO stage 0 cannot load"
    if saved["zero_stage"] != stage:
        return f"it was saved with ZeRO stage {saved['zero_stage']} and this run uses stage {stage}"
    if stage > 0 and saved["world_size"] != world:
        return (f"its ZeRO-{stage} optimizer partitions were saved by {saved['world_size']} ranks and do not load "
                f"on {world} ranks; to keep them, convert first: python tools/reshard_checkpoint.py "
                f"--checkpoint CKPT --world {world} --out NEW_DIR")
    return None


def _load_engine(engine, path: str, manifest: Mapping[str, Any], world: int, fresh_optimizer: bool) -> bool:
    """Load DeepSpeed's state; True when its optimizer state was restored as well as the weights."""
    saved = manifest["engine"]
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no engine state (saved with engine=None)")
    mismatch = "the optimizer state is started afresh" if fresh_optimizer else \
        _engine_mismatch(saved, _zero_stage(engine), world)
    if mismatch is not None and not fresh_optimizer:
        warnings.warn(f"checkpoint {path}: engine optimizer state (e.g. Adam moments) re-initialised, module "
                      f"weights restored: {mismatch}", stacklevel=3)
    universal = saved["format"] == "universal" and mismatch is None
    # DeepSpeed reads this flag at load time only (0.19.8); set for this call as the config key
    # checkpoint.load_universal would
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(path, tag=ENGINE_TAG, load_optimizer_states=mismatch is None,
                                              load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = previous
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state of {path} (directory {ENGINE_TAG}/)")
    return mismatch is None


# ---------------------------------------------------------------------------------------------
# RNG states as plain data (weights_only-loadable)

def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """torch (CPU and `device` if CUDA), numpy and python RNG states as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": list(python_state), "gauss": gauss}}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Sampling generators (Partial FC, center sampling): their state belongs to one device type

_CPU_GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()  # mt19937: 5056; CUDA's Philox: 16


def capture_generator_state(generator: torch.Generator) -> dict[str, Any]:
    """`generator`'s state with the device type it belongs to (a CUDA state does not fit a CPU generator)."""
    return {"device_type": generator.device.type, "state": generator.get_state()}


def reseed_value(initial_seed: int, step: int) -> int:
    """The seed a generator restarts from when its saved state is of another device type.

    Depends only on the generator's construction seed (train.seed and the rank) and the resumed
    step, so every resume of that checkpoint on that device type draws the same stream.
    """
    return (initial_seed + 0x9E37_79B9_7F4A_7C15 * (step + 1)) % 2**64


def restore_generator_state(generator: torch.Generator, saved: Any, *, step: int) -> bool:
    """Put a `capture_generator_state` result back; True if restored, False if re-seeded.

    A state saved on another device type (CUDA <-> CPU) cannot be set: `generator` is re-seeded
    with `reseed_value(generator.initial_seed(), step)` instead. A bare state tensor (checkpoints
    written before the device type was recorded) is typed by its size.
    """
    if torch.is_tensor(saved):
        saved = {"device_type": "cpu" if saved.numel() == _CPU_GENERATOR_STATE_BYTES else "cuda", "state": saved}
    if saved["device_type"] == generator.device.type:
        generator.set_state(saved["state"])
        return True
    generator.manual_seed(reseed_value(generator.initial_seed(), step))
    return False
