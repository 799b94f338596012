"""Assemble a `Trainer` from a `Config`: data, backbone engine, head, optimizers, schedule, logs, checkpoints."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from largefr.choices import HEAD_OPTIMIZERS, TORCH_DTYPE_NAMES
from largefr.config import Config, ModelConfig, config_to_json
from largefr.data.prepare import DataSetupError, PreparedData, prepare_data
from largefr.eval.own_data import load_own_data_share
from largefr.eval.verification import load_verification_share
from largefr.heads.joint import ClusterGuidedHead
from largefr.heads.momentum import MomentumEncoder
from largefr.heads.optim import RowSparseAdamW, RowSparseSGD
from largefr.heads.precision import STORAGE_DTYPES
from largefr.heads.sharded_head import ShardedMarginHead
from largefr.train.banner import resume_note, world_note
from largefr.train.compile import prepare_step_modules
from largefr.train.distributed_env import DistributedEnv
from largefr.train.engine import accelerator_facts, build_deepspeed_config, build_optimizer, create_engine
from largefr.train.head_step import ExternalHeadStep
from largefr.train.metrics import MetricsLogger
from largefr.train.schedule import build_lr_schedule, steps_per_epoch
from largefr.train.step import StepRunner
from largefr.checkpoint.train_state import TrainingCheckpointer
from largefr.train.warm_start import class_mean_warm_start, load_init_weights
from largefr.train.trainer import LoopPlan, Trainer
from largefr.train.verifier import VerificationSet, Verifier


def seed_everything(seed: int, rank: int) -> None:
    """Same torch seed on every rank (identical backbone init); per-rank numpy/python streams."""
    torch.manual_seed(seed)
    np.random.seed((seed + 1_000_003 * rank) % 2**32)
    random.seed(seed + 1_000_003 * rank)


CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
"""CUBLAS_WORKSPACE_CONFIG that makes cuBLAS deterministic (CUDA >= 10.2; torch refuses its GEMMs otherwise)."""


def set_determinism(deterministic: bool) -> None:
    """train.deterministic: deterministic torch kernels on or off for this process (set, not just turned on).

    On: torch.use_deterministic_algorithms(True) (an op with no deterministic kernel raises, naming itself),
    cuDNN deterministic with autotuning (benchmark) off, and CUBLAS_WORKSPACE_CONFIG set unless the user set
    it (cuBLAS reads it when its handle is created, at the first GEMM, which comes after this call). The
    loaders need nothing more: DALI's pipeline is seeded from (train.seed, epoch, rank) and the torch
    loader's shuffle, flips and augmentations from (train.seed, epoch, rank, position) in every run.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)


def load_verification_sets(prepared: PreparedData) -> list[VerificationSet]:
    """This rank's share of every data.val_targets set (a .bin file, or pairs drawn from an identity folder)."""
    sets, env = [], prepared.env
    for name, path in prepared.verification_paths():
        load = load_own_data_share if os.path.isdir(path) else load_verification_share
        images, issame, _ = load(path, image_size=prepared.config.data.image_size, rank=env.rank,
                                 world_size=env.world_size)
        sets.append(VerificationSet(name=name, local_images=images, issame=issame))
    return sets


@dataclass(kw_only=True)
class HeadParts:
    head: ClusterGuidedHead
    weight_optimizer: torch.optim.Optimizer
    tau_optimizer: torch.optim.Optimizer | None
    step: ExternalHeadStep


def build_head(config: Config, env: DistributedEnv) -> HeadParts:
    """The joint head (margin head + cluster terms) and its own optimizers, outside the engine."""
    h, optim = config.head, config.optim
    margin_head = ShardedMarginHead(
        config.data.num_classes, config.model.embedding_size, margin=h, sample_rate=h.sample_rate,
        init_std=h.init_std, chunk_size=h.chunk_size,
        logits_dtype=getattr(torch, TORCH_DTYPE_NAMES[h.logits_dtype]), dtype=STORAGE_DTYPES[h.weight_dtype],
        device=env.device, generator=torch.Generator().manual_seed(config.train.seed))
    head = ClusterGuidedHead(margin_head, config.cluster, seed=config.train.seed)
    lr = optim.effective_head_lr
    if HEAD_OPTIMIZERS[optim.name] == "sgd":
        weight_optimizer = RowSparseSGD([margin_head.weight], lr=lr, momentum=optim.momentum,
                                        weight_decay=optim.weight_decay)
    else:
        weight_optimizer = RowSparseAdamW([margin_head.weight], lr=lr, betas=tuple(optim.betas),
                                          weight_decay=optim.weight_decay)
    replicated = list(head.replicated_parameters().values())
    tau_optimizer = None
    if replicated:  # the learnable temperatures: no weight decay (it would pull log tau to 0, tau to 1)
        tau_optimizer = build_optimizer(replicated, name=optim.name, lr=lr, momentum=optim.momentum,
                                        weight_decay=0.0, betas=tuple(optim.betas))
    step = ExternalHeadStep([o for o in (weight_optimizer, tau_optimizer) if o is not None],
                            sharded=[margin_head.weight], replicated=replicated,
                            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
                            clip_norm=optim.head_grad_clip, group=head.group)
    return HeadParts(head=head, weight_optimizer=weight_optimizer, tau_optimizer=tau_optimizer, step=step)


def build_engine(config: Config, env: DistributedEnv, *, load_init: bool = True):
    """(engine, momentum encoder or None); the encoder is an fp32 copy of the backbone (model.init_from
    loaded first unless `load_init` is False) before wrapping."""
    from largefr.models import get_model

    m = config.model
    backbone = get_model(m.network, embedding_size=m.embedding_size, dropout=m.dropout,
                         image_size=config.data.image_size, **backbone_options(m))
    if m.init_from is not None and load_init:
        source = load_init_weights(backbone, m.init_from, network=m.network, embedding_size=m.embedding_size,
                                   device=env.device)
        if env.is_main:
            print(f"largefr: backbone loaded from {source} (model.init_from)", file=sys.stderr, flush=True)
    encoder = None
    if config.cluster.enabled:
        encoder = MomentumEncoder(backbone, momentum=config.cluster.encoder_momentum, dtype=torch.float32)
        encoder.to(env.device)
    accelerator, fp16_supported = accelerator_facts()
    ds_config = build_deepspeed_config(
        micro_batch_size=config.train.batch_size, gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        world_size=env.world_size, zero_stage=config.train.zero_stage, precision=config.train.precision,
        gradient_clipping=config.optim.gradient_clipping, user_section=config.deepspeed,
        accelerator_name=accelerator, fp16_supported=fp16_supported,
        overlap_reduction=config.train.overlap_reduction)
    optimizer = build_optimizer(backbone.parameters(), name=config.optim.name, lr=config.optim.lr,
                                momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
                                betas=tuple(config.optim.betas))
    engine = create_engine(backbone, optimizer, ds_config)
    prepare_step_modules(engine, encoder, compile=config.train.compile, channels_last=config.train.channels_last,
                         backend=config.train.compile_backend)
    return engine, encoder


def backbone_options(model: ModelConfig) -> dict:
    """get_model options of the model section beyond name, size and dropout (the ViT rates only where set)."""
    rates = {"drop_path_rate": model.drop_path_rate, "mask_ratio": model.mask_ratio}
    return {"activation_checkpointing": model.activation_checkpointing,
            **{name: value for name, value in rates.items() if value is not None}}


def build_trainer(config: Config, env: DistributedEnv, *, resume: str | None = None) -> Trainer:
    """Everything a run needs, on every rank; `resume` overrides checkpoint.resume ('auto' or a path)."""
    seed_everything(config.train.seed, env.rank)
    set_determinism(config.train.deterministic)
    prepared = prepare_data(config, env)
    config = prepared.config  # data.num_classes and data.num_images read from the data
    verification_sets = load_verification_sets(prepared)
    loader = prepared.open_loader()
    requested = resume if resume is not None else config.checkpoint.resume
    resume_path = _resolve_resume(requested, config)
    engine, encoder = build_engine(config, env, load_init=resume_path is None)
    parts = build_head(config, env)
    if config.head.init == "class_mean" and resume_path is None:
        warm_start_head(prepared, parts.head, encoder.encoder if encoder is not None else engine.module)
    runner = StepRunner(engine=engine, head=parts.head, head_step=parts.step, momentum_encoder=encoder,
                        encoder_momentum=config.cluster.encoder_momentum, group=parts.head.group,
                        on_nonfinite=config.train.on_nonfinite, device=env.device, loss_same_on_every_rank=True,
                        overlap_reduction=config.train.overlap_reduction)
    global_batch = config.global_batch_size(env.world_size)
    per_epoch = steps_per_epoch(config.data.num_images, global_batch)
    _check_loader_length(config, loader, per_epoch, env)
    s = config.schedule
    schedule = build_lr_schedule(type=s.type, unit=s.unit, base_lr=config.optim.lr, epochs=s.epochs,
                                 steps_per_epoch=per_epoch, warmup=s.warmup, milestones=s.milestones, gamma=s.gamma,
                                 power=s.power)
    total = min(schedule.total_steps, config.train.max_steps or schedule.total_steps)
    plan = LoopPlan(steps_per_epoch=per_epoch, total_steps=total,
                    gradient_accumulation_steps=config.train.gradient_accumulation_steps,
                    checkpoint_every=config.checkpoint.every,
                    max_consecutive_nonfinite=config.train.max_consecutive_nonfinite,
                    freeze_backbone_steps=config.train.freeze_backbone_steps)
    checkpointer = TrainingCheckpointer(str(config.checkpoint_dir), head=parts.head,
                                        weight_optimizer=parts.weight_optimizer, tau_optimizer=parts.tau_optimizer,
                                        momentum_encoder=encoder, keep_last=config.checkpoint.keep_last,
                                        config=config.to_dict(), device=env.device)
    metrics = MetricsLogger(config.output, rank=env.rank, every=config.logging.every, total_steps=total,
                            global_batch=global_batch, warmup_steps=min(5, max(total - 1, 0)),
                            start_step=_saved_step(resume_path), tensorboard=config.logging.tensorboard,
                            log_file=config.logging.log_file, device=env.device)
    trainer = Trainer(runner=runner, loader=loader, schedule=schedule,
                      head_lr_factor=config.optim.effective_head_lr / config.optim.lr, plan=plan, metrics=metrics,
                      checkpointer=checkpointer,
                      verifier=Verifier(sets=verification_sets, every=config.eval.every,
                                        batch_size=config.eval.batch_size, folds=config.eval.nfolds, flip=config.eval.flip,
                                        embedding_size=config.model.embedding_size, device=env.device,
                                        group=parts.head.group),
                      summary_fields=_summary_fields(config, env, global_batch),
                      summary_path=os.path.join(config.output, "summary.json"),
                      stats_fn=_stats_fn(parts.head), rank=env.rank,
                      records_left_out=prepared.records_left_out,
                      nan_steps=(frozenset(config.train.debug_inject_nan_steps)
                                 if env.rank == config.train.debug_inject_nan_rank else frozenset()))
    _announce(config, env, trainer, world_note(config, env.world_size),
              resume_note(requested, resume_path, str(config.checkpoint_dir)))
    if resume_path is not None:
        checkpointer.restore(trainer, resume_path)
    return trainer


def warm_start_head(prepared: PreparedData, head: ClusterGuidedHead, backbone: torch.nn.Module) -> None:
    """head.init='class_mean': the loaded backbone's class means into W and the cluster bank (one data pass)."""
    config, env = prepared.config, prepared.env
    loader = prepared.open_loader(batch_size=config.eval.batch_size, shuffle=False, random_flip=False, drop_last=False,
                                  augment=None)
    done = class_mean_warm_start(head, backbone, loader, alpha=config.cluster.alpha, init_std=config.head.init_std,
                                 device=env.device, batch_size=config.eval.batch_size, progress=env.is_main)
    if env.is_main:
        print(f"largefr: head.init=class_mean: {done['classes']:.0f} of {done['num_classes']:.0f} classes set from "
              f"{done['images']:.0f} images", file=sys.stderr, flush=True)


def _check_loader_length(config: Config, loader, per_epoch: int, env: DistributedEnv) -> None:
    """An epoch of the schedule must not need more batches than the loader yields."""
    needed = per_epoch * config.train.gradient_accumulation_steps
    if len(loader) < needed:
        readable = len(loader) * config.train.batch_size * env.world_size
        raise DataSetupError(
            f"data.num_images={config.data.num_images} asks for {per_epoch} steps per epoch ({needed} batches per "
            f"rank), but the {config.data.loader} loader yields {len(loader)} batches of {config.train.batch_size} "
            f"per rank (about {readable} images over {env.world_size} ranks): set data.num_images to the number of "
            "images in the data set")


def _resolve_resume(resume: str | None, config: Config) -> str | None:
    from largefr.checkpoint.save_load import resolve_checkpoint

    return resolve_checkpoint(resume, str(config.checkpoint_dir))


def _saved_step(path: str | None) -> int:
    if path is None:
        return 0
    from largefr.checkpoint.save_load import validate_checkpoint

    return int(validate_checkpoint(path)["step"])


def _stats_fn(head: ClusterGuidedHead):
    def stats() -> dict[str, float]:
        return {f"cluster/{key}": value for key, value in head.stats().items()
                if isinstance(value, (int, float)) and not key.startswith("loss")}
    return stats


def _summary_fields(config: Config, env: DistributedEnv, global_batch: int) -> dict:
    return {"world_size": env.world_size, "zero_stage": config.train.zero_stage, "precision": config.train.precision,
            "network": config.model.network, "num_classes": config.data.num_classes, "global_batch": global_batch,
            "loader": config.data.loader, "launcher": env.launcher, "device": str(env.device)}


def _announce(config: Config, env: DistributedEnv, trainer: Trainer, *notes: str | None) -> None:
    if env.is_main:
        os.makedirs(config.output, exist_ok=True)
        Path(config.output, "config.json").write_text(config_to_json(config))
    plan = trainer.plan
    trainer.metrics.info(
        f"largefr: {env.world_size} rank(s) via {env.launcher}, {env.backend} on {env.device}; "
        f"{config.model.network} ZeRO {config.train.zero_stage} {config.train.precision}; "
        f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps; output {config.output}")
    for note in filter(None, notes):
        trainer.metrics.info(f"largefr: {note}")
