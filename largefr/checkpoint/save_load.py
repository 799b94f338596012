"""Atomic, resharding checkpoints of the whole training state (docs/DESIGN.md section 8).

Save (collective over the data-parallel `group`; every rank calls it)::

    path = save_checkpoint(root, step, engine=engine, partition=partition, head_rows={...},
                           head_extra={...}, replicated={...}, keep_last=3, group=group)

writes ``<root>/step_<step>.tmp-<pid>/`` (DeepSpeed engine under ``engine/``, one head file per
rank, ``replicated.pt`` from rank 0, ``manifest.json`` last), then rank 0 renames it to
``<root>/step_<step>`` and deletes complete checkpoints beyond the newest `keep_last`. A
directory without a valid manifest, a ``.tmp-`` directory or a file of the wrong size is never
resumed. Resume (collective)::

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
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from largefr.checkpoint.files import (ENGINE_TAG, HEAD_FILE_PATTERN, MANIFEST_NAME, REPLICATED_NAME,
                                      STEP_DIR_PATTERN, CheckpointError, file_digest,
                                      fsync_dir, head_file_name, list_files, list_step_dirs, make_manifest,
                                      safe_load, save_file, scan_engine_files, step_dir_name,
                                      validate_checkpoint, verify_digests, write_manifest)
from largefr.checkpoint.reshard import (allocate_rows, check_compatible, load_head_rows, restore_head_rows,
                                        row_schema)
from largefr.distributed.collectives import group_rank, group_size
from largefr.distributed.partition import ClassPartition

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "find_latest_checkpoint",
           "resolve_checkpoint", "locate_checkpoint", "validate_checkpoint", "load_head_rows", "capture_rng_state", "restore_rng_state",
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
    failures = [(rank, e) for rank, e in enumerate(_all_gather(error, group)) if e is not None]
    if failures:
        rank, first = failures[0]
        raise CheckpointError(first if len(failures) == 1 else f"rank {rank}: {first} (and {len(failures) - 1} more)")


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


def _make_tmp_dir(root: str, step: int, group) -> str:
    """Rank 0 names and creates the temporary directory (its pid) and tells the others."""
    outcome: tuple[str | None, str | None] = (None, None)
    if group_rank(group) == 0:
        def create() -> str:
            tmp = os.path.join(root, f"{step_dir_name(step)}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed writer that had the same pid
            os.makedirs(tmp)  # creates the root too
            return tmp
        outcome = _attempt(create)
    tmp, error = _broadcast_from_first(outcome, group)
    if error is not None:
        raise CheckpointError(f"cannot create a checkpoint directory under {root}: {error}")
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


def save_checkpoint(ckpt_root: str, step: int, *, engine, partition: ClassPartition,
                    head_rows: Mapping[str, torch.Tensor], head_extra: Mapping[str, Any] | None = None,
                    replicated: Mapping[str, Any] | None = None, keep_last: int = 0, group=None) -> str:
    """Write the checkpoint of `step` atomically; collective over `group`; returns its directory.

    engine: the DeepSpeed engine (its `save_checkpoint` is called with tag 'engine'); None writes
      no engine state. head_rows: name -> tensor with dim 0 == partition.num_local (W rows, bank
      rows, phi, has_phi, head optimizer per-row state). head_extra: this rank's non-row values
      (RNG states, ...); dropped when resumed at another world size. replicated: state identical
      on all ranks, written by rank 0 (others may pass None). keep_last: complete checkpoints to
      keep (0 = all). Only plain data is accepted (see `files.check_plain`).
    """
    _check_group(partition, group)
    rank, world = partition.rank, partition.world_size
    tmp = _make_tmp_dir(ckpt_root, step, group)
    if engine is not None:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, client_state={}, save_latest=False)
    written, error = _attempt(lambda: _write_own_files(tmp, step, partition, head_rows, head_extra, replicated))
    _raise_together(error, group)
    _debug_die_mid_save(step, rank)
    names = _broadcast_from_first(list_files(tmp), group)
    digests, error = _attempt(lambda: {**written, **_digest_share(tmp, names, rank, world)})
    gathered = _all_gather((digests, error, row_schema(head_rows)), group)
    failure = next((e for _, e, _ in gathered if e), None)
    if failure is not None:  # every rank holds the same gathered list: all raise alike
        raise CheckpointError(failure)
    outcome = None
    if rank == 0:
        outcome = _finish(ckpt_root, step, tmp, world, partition.num_classes, gathered, engine, keep_last)
    outcome = _broadcast_from_first(outcome, group)
    if outcome["error"]:
        raise CheckpointError(outcome["error"])
    return outcome["path"]


def _debug_die_mid_save(step: int, rank: int) -> None:
    """FAULT INJECTION (tests only): $LARGEFR_DEBUG_KILL_IN_SAVE="STEP:RANK" SIGKILLs that rank mid-save."""
    target = os.environ.get("LARGEFR_DEBUG_KILL_IN_SAVE")
    if target and target == f"{step}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _finish(root: str, step: int, tmp: str, world: int, num_classes: int, gathered: list, engine,
            keep_last: int) -> dict[str, Any]:
    """Rank 0: manifest (last file), rename into place, prune. Returns the outcome for all ranks."""
    schemas = [schema for _, _, schema in gathered]
    if any(schema != schemas[0] for schema in schemas):
        return {"error": f"head rows differ between ranks (names/widths/dtypes): {schemas}", "path": None}
    files = {name: entry for digests, _, _ in gathered for name, entry in digests.items()}
    final = os.path.join(root, step_dir_name(step))
    try:
        write_manifest(tmp, make_manifest(step=step, world_size=world, num_classes=num_classes,
                                          row_schema=schemas[0], engine=_engine_entry(engine, world), files=files))
        _rename_into_place(tmp, final)
    except OSError as error:
        return {"error": f"could not finish checkpoint {final}: {error}", "path": None}
    try:
        _prune(root, step, final, keep_last)
    except OSError as error:  # the new checkpoint is complete: a failed clean-up must not fail the run
        log.warning("could not delete old checkpoints under %s: %s", root, error)
    return {"error": None, "path": final}


def _rename_into_place(tmp: str, final: str) -> None:
    """A checkpoint of the same step (saved again after a resume) is replaced, never merged."""
    if os.path.exists(final):
        aside = f"{final}.old-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def _prune(root: str, step: int, final: str, keep_last: int) -> None:
    """Delete old complete checkpoints beyond `keep_last`, leftovers of interrupted writes, and set
    aside checkpoints of later steps (an abandoned timeline) so that 'auto' resumes this one.

    Assumes one training run writes to `root` at a time.
    """
    for other_step, path in list_step_dirs(root):
        if other_step > step:
            log.warning("checkpoint %s is from a later step than the one just written (%s); renaming it to "
                        "%s.superseded so that resume picks the new one", path, final, path)
            os.rename(path, f"{path}.superseded")
    for name in os.listdir(root):
        if ".tmp-" in name or ".old-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last <= 0:
        return
    complete = [path for _, path in list_step_dirs(root) if _is_complete(path)]
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _is_complete(path: str) -> bool:
    try:
        validate_checkpoint(path)
        return True
    except CheckpointError:
        return False


# ---------------------------------------------------------------------------------------------
# Find and load

def find_latest_checkpoint(ckpt_root: str) -> str | None:
    """The complete checkpoint of the highest step under `ckpt_root` (None if there is none).

    Half-written ones (no manifest, `.tmp-` names, missing or truncated files) are skipped.
    """
    for _, path in reversed(list_step_dirs(ckpt_root)):
        if _is_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s", path)
    return None


def resolve_checkpoint(resume: str | None, ckpt_root: str) -> str | None:
    """`checkpoint.resume` to a directory: None -> None; 'auto' -> latest complete under `ckpt_root`
    or None; a path -> as `locate_checkpoint`."""
    if resume is None:
        return None
    if resume == "auto":
        return find_latest_checkpoint(ckpt_root)
    return locate_checkpoint(resume)


CHECKPOINT_NAMING = "a run folder, its checkpoints/ folder or one step_<N> folder"
"""What every tool's --checkpoint (and checkpoint.resume, model.init_from) accepts."""


def locate_checkpoint(path: str) -> str:
    """The checkpoint `path` names: a step_<N> folder (must be complete), or the latest complete one of a
    checkpoints/ folder or of a run folder; the error says what was found there."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder; name {CHECKPOINT_NAMING}")
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)) or STEP_DIR_PATTERN.match(os.path.basename(os.path.normpath(path))):
        validate_checkpoint(path)  # one named checkpoint: say exactly what is wrong with it
        return path
    root = path
    if not list_step_dirs(root) and os.path.isdir(os.path.join(path, "checkpoints")):
        root = os.path.join(path, "checkpoints")  # a run folder
    steps = list_step_dirs(root)
    if not steps:
        entries = sorted(os.listdir(root))
        shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") if entries else "nothing"
        raise CheckpointError(f"{root}: holds no checkpoint (found: {shown}); name {CHECKPOINT_NAMING}")
    latest = find_latest_checkpoint(root)
    if latest is None:
        reasons = "; ".join(f"{os.path.basename(step_dir)}: {_why_incomplete(step_dir)}" for _, step_dir in steps)
        raise CheckpointError(f"{root}: holds {len(steps)} step_<N> folder(s), none complete ({reasons})")
    return latest


def _why_incomplete(path: str) -> str:
    try:
        validate_checkpoint(path)
    except CheckpointError as error:
        return str(error).replace(f"checkpoint {path} ", "").replace(f"checkpoint {path}: ", "")
    return "complete"


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
                verify: bool) -> tuple[dict | None, dict]:
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
    extra = restore_head_rows(path, manifest, partition, rows, verify=verify)
    return extra, safe_load(os.path.join(path, REPLICATED_NAME))


def load_checkpoint(path: str, *, engine, partition: ClassPartition, group=None,
                    expected_rows: Mapping[str, Any] | None = None, verify: bool = True,
                    rows: Mapping[str, torch.Tensor] | None = None) -> LoadedCheckpoint:
    """Restore the engine in place, fill the head rows and return them with the extras and replicated
    state; collective.

    expected_rows: name -> row width (shape after dim 0) this run uses; a checkpoint with other
    names or widths is refused. verify: compare sha256 digests (each rank hashes a share). rows:
    name -> destination tensor of this rank's class range (the live classifier, optimizer and bank
    tensors), filled in place block by block; None allocates new CPU tensors. On an error the
    destinations may be partly overwritten (every rank raises).
    """
    _check_group(partition, group)
    manifest = validate_checkpoint(path)  # same files on every rank: all ranks raise alike
    check_compatible(path, manifest, partition.num_classes, expected_rows)
    destinations = dict(rows) if rows is not None else allocate_rows(manifest, partition)
    result, error = _attempt(lambda: _read_local(path, manifest, partition, destinations, verify))
    _raise_together(error, group)
    extra, replicated = result
    restored = _load_engine(engine, path, manifest, partition.world_size) if engine is not None else False
    return LoadedCheckpoint(path=path, step=manifest["step"], head_rows=destinations, head_extra=extra,
                            replicated=replicated, saved_world_size=manifest["world_size"],
                            engine_optimizer_restored=restored)


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


def _load_engine(engine, path: str, manifest: Mapping[str, Any], world: int) -> bool:
    """Load DeepSpeed's state; True when its optimizer state was restored as well as the weights."""
    saved = manifest["engine"]
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no engine state (saved with engine=None)")
    mismatch = _engine_mismatch(saved, _zero_stage(engine), world)
    if mismatch is not None:
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
