"""Assemble a `Trainer` from a `Config`: data, backbone engine, head, optimizers, schedule, logs, checkpoints."""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from largefr.config import HEAD_OPTIMIZERS, TORCH_DTYPE_NAMES, Config, ModelConfig, config_to_json
from largefr.data.rec_set import data_folder
from largefr.heads.joint import ClusterGuidedHead
from largefr.heads.margin import MarginConfig, adaptive_margin_settings
from largefr.heads.momentum import MomentumEncoder
from largefr.heads.optim import RowSparseAdamW, RowSparseSGD
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
from largefr.train.trainer import LoopPlan, Trainer, VerificationSet


class DataSetupError(RuntimeError):
    """Training or verification data that is missing or unusable; the message names the path and key."""


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


def run_on_first_rank(action, what: str, *, device: torch.device) -> None:
    """Run `action` on rank 0 while the others wait; every rank raises if it failed (no hang).

    `device` is where the process group's collectives run (NCCL refuses CPU tensors).
    """
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            action()
        except Exception as exc:  # reported on every rank below
            error = f"{what} failed on rank 0: {type(exc).__name__}: {exc}"
            if not dist.is_initialized():
                raise DataSetupError(error) from exc
    if dist.is_initialized():
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag)  # the wait is bounded by the process group's timeout
        if flag.item() > 0:
            raise DataSetupError(error or f"{what} failed on rank 0 (see its error above)")


def ensure_synthetic_data(config: Config, *, progress: bool = True) -> None:
    """Generate data.synthetic into its cache folder unless it already holds it (a stale one is replaced).

    One process only (two generations into one folder race): rank 0 here, or tools/ablate.py before its runs.
    """
    from largefr.data.synthetic import META_FILE, ensure_dataset

    data, synthetic = config.data, config.data.synthetic
    first_time = progress and not os.path.isfile(os.path.join(data.data_dir, META_FILE))
    if first_time:  # the generator's own progress lines carry no time; these two frame them
        _stamped(f"generating the synthetic data set into {data.data_dir} (once; later runs reuse it)")
    started = time.perf_counter()
    ensure_dataset(data.data_dir, identities=synthetic.identities, images_per_identity=synthetic.images_per_identity,
                   pairs=synthetic.val_pairs, image_size=data.image_size, seed=synthetic.seed,
                   heldout_identities=synthetic.heldout_identities,
                   heldout_images_per_identity=synthetic.heldout_images_per_identity,
                   workers=max(1, min(4, os.cpu_count() or 1)), progress=progress, replace_stale=True)
    if first_time:
        _stamped(f"synthetic data set ready in {time.perf_counter() - started:.0f} s")


def _stamped(message: str) -> None:
    """A timestamped largefr line on stdout, as the run's log lines look (before the run's logger exists)."""
    print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] largefr: {message}", flush=True)


def prepare_data_dir(config: Config, env: DistributedEnv) -> str | None:
    """The folder of train.rec/idx/property (generated first for the synthetic quickstart)."""
    data = config.data
    if data.loader == "synthetic" and not data.val_targets:
        return data.data_dir
    folder = data.data_dir
    if folder is None:
        raise DataSetupError("data.rec is not set: give the folder holding train.rec, train.idx and property "
                             "(or data.synthetic.cache_dir for a generated data set)")
    if data.images is not None:
        from largefr.data.pack import ensure_packed

        run_on_first_rank(lambda: ensure_packed(data.images, data.cache_dir, on_bad_image=data.on_bad_image),
                          f"packing data.images={data.images} into {folder}", device=env.device)
    elif data.rec is None and data.synthetic is not None:
        def generate() -> None:
            ensure_synthetic_data(config, progress=env.is_main)

        run_on_first_rank(generate, f"generating the synthetic data set in {folder}", device=env.device)
    missing = [entry for entry in ([folder] if isinstance(folder, str) else folder) if not os.path.exists(entry)]
    if missing:
        raise DataSetupError(f"data folder {missing[0]} (data.rec) does not exist: point data.rec at the folder holding "
                             "train.rec, train.idx and property (or shards train-00000.rec ..., a .rec file, or "
                             "a list of them)")
    return folder


def with_data_counts(config: Config, folder: str | None, env: DistributedEnv) -> Config:
    """`config` with data.num_classes / num_images read from the data where not given (checked where given)."""
    from largefr.config_validation import world_size_issues
    from largefr.data import prepare_image_index
    from largefr.data.image_index import counts_from_data

    data = config.data
    if data.loader == "synthetic":
        return config  # nothing to count: the config check required both
    index = prepare_image_index(folder, on_bad_image=data.on_bad_image, cache_dir=data.cache_dir)
    num_classes, num_images = counts_from_data(folder, index, num_classes=data.num_classes,
                                               num_images=data.num_images)
    resolved = dataclasses.replace(config, data=dataclasses.replace(data, num_classes=num_classes,
                                                                    num_images=num_images))
    issues = world_size_issues(resolved, env.world_size)
    if issues:
        raise DataSetupError("; ".join(f"{key}: {problem}" for key, problem in issues)
                             + f" (counts read from the data in {folder})")
    return resolved


def _verification_candidates(target: str, config: Config, folder: str | None) -> list[str]:
    """Where a data.val_targets entry may be: a path (with '.bin' or a folder part) as given, relative to the
    working directory; a bare name as <name>.bin in the data folder, beside data.images, then here."""
    if target.endswith(".bin") or os.sep in target:
        return [target] if target.endswith(".bin") else [target, f"{target}.bin"]
    folders = [data_folder(folder), config.data.images, os.getcwd()]
    return list(dict.fromkeys(os.path.join(f, f"{target}.bin") for f in folders if f))


def verification_paths(config: Config, folder: str | None) -> list[tuple[str, str]]:
    """(name, path) of every data.val_targets entry (see _verification_candidates for where it is looked for); a
    path may also be a folder of identity sub-folders or of train.rec (pairs drawn as tools/eval_folder.py draws
    them)."""
    out = []
    for target in config.data.val_targets:
        candidates = _verification_candidates(target, config, folder)
        path = next((c for c in candidates if os.path.isfile(c) or os.path.isdir(c)), None)
        if path is None:
            raise DataSetupError(f"verification set {target!r} (data.val_targets) not found; looked for "
                                 f"{', '.join(candidates)}. Give a .bin path (or an identity folder) relative to the "
                                 f"working directory ({os.getcwd()}) or an absolute one, or remove the entry")
        out.append((Path(path).name if os.path.isdir(path) else Path(path).stem, path))
    return out


def load_verification_sets(config: Config, folder: str | None, env: DistributedEnv) -> list[VerificationSet]:
    from largefr.eval.own_data import load_own_data_share
    from largefr.eval.verification import load_verification_share

    sets = []
    for name, path in verification_paths(config, folder):
        load = load_own_data_share if os.path.isdir(path) else load_verification_share
        images, issame, _ = load(path, image_size=config.data.image_size, rank=env.rank, world_size=env.world_size)
        sets.append(VerificationSet(name=name, local_images=images, issame=issame))
    return sets


def build_train_loader(config: Config, folder: str | None, env: DistributedEnv):
    from largefr.data import build_loader

    data = config.data
    return build_loader(data.loader, rec=folder, batch_size=config.train.batch_size, rank=env.rank,
                        world_size=env.world_size, num_classes=data.num_classes, local_rank=env.local_rank,
                        seed=config.train.seed, image_size=data.image_size, num_workers=data.num_workers,
                        shuffle=True, random_flip=data.random_flip, shuffle_buffer=data.shuffle_buffer,
                        on_bad_image=data.on_bad_image, drop_last=True, num_images=data.num_images,
                        cache_dir=data.cache_dir, device=env.device, augment=data.augment)


@dataclass(kw_only=True)
class HeadParts:
    head: ClusterGuidedHead
    weight_optimizer: torch.optim.Optimizer
    tau_optimizer: torch.optim.Optimizer | None
    step: ExternalHeadStep


def build_head(config: Config, env: DistributedEnv) -> HeadParts:
    """The joint head (margin head + cluster terms) and its own optimizers, outside the engine."""
    h, optim = config.head, config.optim
    margin = MarginConfig(type=h.type, scale=h.scale, margin=h.margin, combined_margins=tuple(h.combined_margins),
                          easy_margin=h.easy_margin, **adaptive_margin_settings(h))
    margin_head = ShardedMarginHead(
        config.data.num_classes, config.model.embedding_size, margin=margin, sample_rate=h.sample_rate,
        init_std=h.init_std, chunk_size=h.chunk_size,
        logits_dtype=getattr(torch, TORCH_DTYPE_NAMES[h.logits_dtype]), device=env.device, generator=torch.Generator().manual_seed(config.train.seed))
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
    folder = prepare_data_dir(config, env)
    config = with_data_counts(config, folder, env)
    verification_sets = load_verification_sets(config, folder, env)
    loader = build_train_loader(config, folder, env)
    requested = resume if resume is not None else config.checkpoint.resume
    resume_path = _resolve_resume(requested, config)
    engine, encoder = build_engine(config, env, load_init=resume_path is None)
    parts = build_head(config, env)
    if config.head.init == "class_mean" and resume_path is None:
        warm_start_head(config, folder, env, parts.head, encoder.encoder if encoder is not None else engine.module)
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
                    eval_every=config.eval.every, checkpoint_every=config.checkpoint.every,
                    max_consecutive_nonfinite=config.train.max_consecutive_nonfinite,
                    debug_nan_steps=(frozenset(config.train.debug_inject_nan_steps)
                                     if env.rank == config.train.debug_inject_nan_rank else frozenset()),
                    freeze_backbone_steps=config.train.freeze_backbone_steps, eval_batch_size=config.eval.batch_size, eval_folds=config.eval.nfolds, eval_flip=config.eval.flip,
                    embedding_size=config.model.embedding_size)
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
                      checkpointer=checkpointer, verification_sets=verification_sets,
                      summary_fields=_summary_fields(config, env, global_batch),
                      summary_path=os.path.join(config.output, "summary.json"),
                      stats_fn=_stats_fn(parts.head), rank=env.rank,
                      records_left_out=0 if config.data.loader == "synthetic" else len(loader.index.bad_keys))
    _announce(config, env, trainer, world_note(config, env.world_size),
              resume_note(requested, resume_path, str(config.checkpoint_dir)))
    if resume_path is not None:
        checkpointer.restore(trainer, resume_path)
    return trainer


def warm_start_head(config: Config, folder: str | None, env: DistributedEnv, head: ClusterGuidedHead,
                    backbone: torch.nn.Module) -> None:
    """head.init='class_mean': the loaded backbone's class means into W and the cluster bank (one data pass)."""
    from largefr.data import build_loader

    data = config.data
    loader = build_loader(data.loader, rec=folder, batch_size=config.eval.batch_size, rank=env.rank,
                          world_size=env.world_size, num_classes=data.num_classes, local_rank=env.local_rank,
                          seed=config.train.seed, image_size=data.image_size, num_workers=data.num_workers,
                          shuffle=False, random_flip=False, on_bad_image=data.on_bad_image, drop_last=False,
                          num_images=data.num_images, cache_dir=data.cache_dir, device=env.device)
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
