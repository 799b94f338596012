"""Backbone weights, from a training checkpoint or from an exported file: one state_dict, no temporary file.

Used by warm start (model.init_from, largefr/train/warm_start.py), evaluation (`--weights` /
`--checkpoint`, largefr/eval/weights.py) and export (tools/export_backbone.py), which is
`checkpoint_backbone` plus a save.

- `checkpoint_backbone(step_dir)`: the engine's module weights of one complete checkpoint
  (`engine/mp_rank_00_model_states.pt`, key 'module'), a leading 'module.' stripped.
- `read_weights_file(path)`: a state_dict file as insightface's `backbone.pth`, `export_backbone`
  or DeepSpeed (`mp_rank_00_model_states.pt`, its 'module' entry) write it.
- `backbone_weights(path)`: either of them, a folder naming a checkpoint (a run folder, its
  checkpoints/ folder or one step_<N> folder).

Wrapper prefixes ('module.' of DataParallel/DeepSpeed, '_orig_mod.' of torch.compile) are removed
when every key has them. Files are read with `torch.load(weights_only=True)`: nothing stored in them runs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from largefr.checkpoint.files import ENGINE_TAG, CheckpointError, safe_load, save_file, validate_checkpoint
from largefr.checkpoint.save_load import locate_checkpoint
from largefr.errors import UserError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of wrapped modules: DataParallel/DeepSpeed's 'module.', torch.compile's '_orig_mod.'."""
_SHOWN_KEYS = 6


class WeightsError(UserError, ValueError):
    """Weights that cannot be read or do not fit the requested network."""


def unwrap_state_dict(loaded: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned ('module' or 'state_dict' entry), wrapper prefixes removed."""
    if isinstance(loaded, Mapping):
        for container in ("module", "state_dict"):
            if isinstance(loaded.get(container), Mapping):
                loaded = loaded[container]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError(f"{source}: expected a state_dict (a dict of tensors), got {type(loaded).__name__}")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{source}: not a state_dict: entries {not_tensors[:_SHOWN_KEYS]} are not tensors")
    state = {str(k): v for k, v in loaded.items()}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """The backbone state_dict in file `path` (weights_only load)."""
    if os.path.isdir(path):
        raise WeightsError(f"--weights {path} is a directory; pass a checkpoint directory with --checkpoint")
    if not os.path.isfile(path):
        raise WeightsError(f"--weights {path}: no such file")
    try:
        loaded = safe_load(path)
    except CheckpointError:
        try:  # a DeepSpeed model-states file; allowing its classes imports deepspeed (seconds), so only now
            loaded = safe_load(path, deepspeed_file=True)
        except CheckpointError as error:
            raise WeightsError(str(error)) from None
    return unwrap_state_dict(loaded, path)


def checkpoint_backbone(checkpoint: str, *, prefix: str = "",
                        dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The engine's module weights of the complete checkpoint folder `checkpoint` (a step_<N> folder).

    Keys: a leading 'module.' is stripped; with `prefix` only keys under it are kept, prefix removed
    (e.g. 'backbone.' when the engine wraps more than the backbone). Floating tensors are cast to
    `dtype` (None keeps the training dtype; under bf16 these are the bf16 weights).
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


def checkpoint_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(backbone weights in float32, checkpoint folder) of a run folder, its checkpoints/ folder or one step_<N>
    folder (its latest complete checkpoint)."""
    try:
        resolved = locate_checkpoint(path)
        weights = checkpoint_backbone(resolved)
    except CheckpointError as error:
        raise WeightsError(str(error)) from None
    return unwrap_state_dict(weights, resolved), resolved


def backbone_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(backbone state_dict, the file or checkpoint folder it came from) of a weights file or a checkpoint folder."""
    if os.path.isdir(path):
        return checkpoint_weights(path)
    return read_weights_file(path), path


def export_backbone(checkpoint: str, out_path: str, *, prefix: str = "",
                    dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """`checkpoint_backbone` written atomically to `out_path` as a plain state_dict loadable with weights_only=True;
    returns the weights."""
    weights = checkpoint_backbone(checkpoint, prefix=prefix, dtype=dtype)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    save_file(weights, tmp, "backbone state_dict")
    os.replace(tmp, out_path)
    return weights
