"""DeepSpeed wiring of the backbone: the DeepSpeed config, the optimizer, the engine (docs/DESIGN.md section 6).

Only the backbone goes into the engine. The head (classifier shard, bank, queue, temperature)
stays outside with its own optimizer: a parameter inside `engine.module` would be overwritten
from rank 0 at `deepspeed.initialize` and its gradient averaged over ranks, both wrong for a shard.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Mapping

import torch

from largefr.errors import UserError

BF16_GRADIENT_REDUCTION = "fp32"
"""DeepSpeed `communication_data_type` written for train.precision=bf16 (the user's deepspeed section may
override it). DeepSpeed's default follows bf16: the data-parallel sum of the backbone gradients (which carry
the head's x world feature-gradient factor) would be rounded to 8 mantissa bits at every hop; in fp32 it is
summed exactly and rounded to bf16 once, for twice the all-reduce bytes (docs/PERFORMANCE.md)."""


OVERLAP_DEFAULTS = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 6_553_600}
"""`zero_optimization` keys written for ZeRO 1 and 2 (the user's deepspeed section may override them): gradients
are reduced in buckets of 6.55M elements (25 MiB of fp32, torch DDP's default bucket) from DeepSpeed's gradient
hooks while backward still runs, instead of all at once after it. DeepSpeed 0.19.8's default bucket is 5e8
elements, larger than most backbones (IResNet-100: 65M), so without a smaller bucket the reduction waits for
the end of backward even with overlap_comm. ZeRO 0 overlaps through `overlapped_backbone` (docs/DESIGN.md
section 6)."""


class EngineConfigError(UserError, ValueError):
    """The DeepSpeed settings asked for cannot work; the message says which key to change."""


def _check_precision(precision: str, zero_stage: int, accelerator_name: str,
                     fp16_supported: bool) -> None:
    """What the accelerator and this DeepSpeed version refuse (the config checked the names)."""
    if precision == "fp16" and not fp16_supported:
        raise EngineConfigError(
            f"train.precision=fp16: DeepSpeed's {accelerator_name} accelerator refuses fp16 "
            "('Type fp16 is not supported on your device'); use train.precision=bf16 or fp32 here, "
            "fp16 on a GPU")
    if precision == "fp16" and zero_stage == 0:
        # DeepSpeed 0.19.8's engine.backward does not scale the loss for ZeRO-0 fp16 while its
        # FP16_Optimizer still divides the gradients by the scale (deepspeedai/DeepSpeed PR 8393).
        raise EngineConfigError(
            "train.precision=fp16 with train.zero_stage=0: DeepSpeed 0.19.8 does not scale the loss "
            "in this combination and its updates come out loss-scale times too small; use "
            "train.zero_stage=1 or 2 with fp16, or train.precision=bf16")


def build_deepspeed_config(*, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int,
                           zero_stage: int, precision: str, gradient_clipping: float,
                           user_section: Mapping[str, Any] | None = None,
                           accelerator_name: str = "cpu", fp16_supported: bool = False,
                           overlap_reduction: bool = False) -> dict[str, Any]:
    """The dict passed to `deepspeed.initialize`, from largefr's keys plus the user's extra keys.

    The arguments come from a checked `Config`: `user_section` holds none of largefr.config's
    DEEPSPEED_OWNED_KEYS, `zero_stage` is one of ZERO_STAGES, `precision` one of PRECISIONS.
    `gradient_clipping` is always written (0.0 = off): DeepSpeed defaults it to 1.0 since 0.19.3.
    bf16 reduces gradients in BF16_GRADIENT_REDUCTION unless the user's section sets communication_data_type.
    `overlap_reduction` (the trainer sets it): ZeRO 1 and 2 reduce gradients while backward runs (OVERLAP_DEFAULTS)
    unless the user's section says otherwise.
    """
    user_section = dict(user_section or {})
    _check_precision(precision, zero_stage, accelerator_name, fp16_supported)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": float(gradient_clipping),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # largefr builds torch SGD too, which ZeRO calls "untested"; its ZeRO path is the generic one.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # largefr logs progress itself
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["communication_data_type"] = BF16_GRADIENT_REDUCTION
    if overlap_reduction and zero_stage in (1, 2):
        config["zero_optimization"].update(OVERLAP_DEFAULTS)
    return _deep_merge(config, user_section)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_optimizer(params, *, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The backbone's torch optimizer for `name`, one of largefr.config's OPTIMIZER_NAMES (optim.name),
    handed to `deepspeed.initialize`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def accelerator_facts() -> tuple[str, bool]:
    """(DeepSpeed accelerator name, whether it supports fp16)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name(), bool(accelerator.is_fp16_supported())


def create_engine(backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """`deepspeed.initialize` on an initialized process group; returns the engine."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def engine_loss_scale(engine) -> float:
    """The factor `engine.backward` multiplied the loss by; read it before `engine.step()`.

    DeepSpeed 0.19.8 scales the loss in `engine.backward` only for ZeRO optimizers (fp16 ZeRO 1/2:
    the optimizer's `cur_scale`) and for its torch-autocast ZeRO-0 grad scaler; bf16 and fp32 use 1.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if not engine.fp16_enabled():
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0
    if isinstance(engine.optimizer, ZeROOptimizer):
        return float(engine.optimizer.cur_scale)
    raise EngineConfigError("fp16 without a ZeRO optimizer: DeepSpeed 0.19.8 does not scale the loss "
                            "(use train.zero_stage >= 1 with fp16)")


def overlapped_backbone(engine) -> torch.nn.Module:
    """What the step runs the backbone through so that its gradient reduction overlaps backward.

    ZeRO 1 and 2 reduce in DeepSpeed's own gradient hooks during backward (`zero_optimization.overlap_comm`
    and its bucket size, OVERLAP_DEFAULTS, written by `build_deepspeed_config(overlap_reduction=True)`).
    ZeRO 0 has no such path in DeepSpeed 0.19.8: `allreduce_gradients` runs after backward, over one flat
    copy of every gradient. For ZeRO 0 with fp32
    parameters and more than one rank, the engine is wrapped in torch's `DistributedDataParallel`, whose
    reducer all-reduces (averages) 25 MiB buckets asynchronously as their gradients become ready, and the
    engine's own all-reduce is turned off (`enable_backward_allreduce`). Forward goes through the wrapper
    (which calls the engine's forward); backward and step stay the engine's. Anything else: the engine.
    bf16 at ZeRO 0 keeps DeepSpeed's path (its BF16_Optimizer accumulates into fp32 copies after backward).
    """
    from torch.nn.parallel import DistributedDataParallel

    group = engine.data_parallel_group
    if (engine.zero_optimization_stage() != 0 or engine_dtype(engine) != torch.float32
            or not engine.enable_backward_allreduce or torch.distributed.get_world_size(group) < 2):
        return engine
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; the device's torch 2.11 knows only it
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = DistributedDataParallel(engine, process_group=group, broadcast_buffers=False,
                                          device_ids=None if engine.device.type == "cpu" else [engine.device])
    engine.enable_backward_allreduce = False  # the reducer above averages the gradients instead
    return wrapped


def engine_dtype(engine) -> torch.dtype:
    """Dtype of the backbone's parameters inside the engine (inputs are cast to it)."""
    first = next(engine.module.parameters())
    return first.dtype

