"""DeepSpeed's part of a checkpoint: its files under `engine/`, written and loaded by DeepSpeed (docs/DESIGN.md
section 8).

The module weights load at any world size and ZeRO stage (checked with DeepSpeed 0.19.8). The engine optimizer
state loads with the same ZeRO stage when the world size is unchanged, for ZeRO 0 at any world size (it is not
partitioned), and for ZeRO 1/2 at any world size once `tools/reshard_checkpoint.py` converted the partitions to
DeepSpeed's universal format (DeepSpeed refuses native ZeRO partitions of another world size). Otherwise the
engine optimizer is re-initialised from the loaded weights, with a warning saying why.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch.distributed as dist

from largefr.checkpoint.files import ENGINE_TAG, CheckpointError, check_shapes, safe_load
from largefr.checkpoint.storage import describe_write_failure, is_write_failure, tensor_bytes


def engine_entry(engine, world: int) -> dict[str, Any] | None:
    """The manifest's record of the engine's files (None: no engine state written)."""
    if engine is None:
        return None
    return {"tag": ENGINE_TAG, "format": "native", "world_size": world, "zero_stage": zero_stage(engine)}


def engine_share_bytes(engine, rank: int) -> int:
    """About the bytes this rank writes of DeepSpeed's checkpoint, counted from the live state: the module
    (data-parallel rank 0) and the optimizer's state and master partitions (ZeRO: every rank its own)."""
    if engine is None:
        return 0
    module = tensor_bytes(dict(engine.module.state_dict())) if rank == 0 else 0
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    if optimizer is None or (zero_stage(engine) == 0 and rank != 0):
        return module
    masters = [p for g in optimizer.param_groups for p in g["params"]] if zero_stage(engine) > 0 else []
    return module + tensor_bytes(list(optimizer.state.values())) + tensor_bytes(masters)


def save_engine(engine, tmp: str, what: str) -> str | None:
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


ENGINE_MODULE_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the module weights (native format; key 'module')."""


def check_engine_module(path: str, manifest: Mapping[str, Any], engine) -> None:
    """The saved module weights against the live module's names and shapes, before DeepSpeed loads them
    (its own error is a raw state_dict size mismatch naming no file)."""
    file = os.path.join(path, ENGINE_TAG, ENGINE_MODULE_FILE)
    if manifest["engine"]["format"] != "native" or not os.path.isfile(file):
        return
    saved = safe_load(file, deepspeed_file=True, mmap=True)
    check_shapes(file, "module", saved.get("module") if isinstance(saved, dict) else None,
                 engine.module.state_dict(), "the file was written for another model or was modified; resume with "
                 "the model it was written with or an earlier checkpoint")


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def engine_mismatch(saved: Mapping[str, Any], stage: int, world: int) -> str | None:
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


def load_engine(engine, path: str, manifest: Mapping[str, Any], world: int, fresh_optimizer: bool) -> bool:
    """Load DeepSpeed's state; True when its optimizer state was restored as well as the weights."""
    saved = manifest["engine"]
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no engine state (saved with engine=None)")
    mismatch = "the optimizer state is started afresh" if fresh_optimizer else \
        engine_mismatch(saved, zero_stage(engine), world)
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
