"""Which config keys may change when a run resumes: the one table, and the comparison made before loading.

Every checkpoint records the config it was written with (`replicated.pt`, key `config`). On resume
that config is compared with the current one before any tensor is read, key by key, and every key
falls under one rule of `RESUME_RULES`:

* FREE: learning rates, schedule, steps, logging, evaluation, data paths and loader settings, batch
  and world size, ... (world size, ZeRO stage and batch changes are handled by the loader). Changes are
  listed in the log when the run resumes.
* OPTIMIZER: the optimizer and the settings that shape its state (`optim.name`; `optim.momentum`
  to or from 0, which adds or drops SGD's momentum buffer). Refused unless
  `checkpoint.reset_optimizer=true`, which resumes the weights with a fresh optimizer state (backbone,
  head rows and temperatures).
* FIXED: what shapes the saved model state (network, embedding size, image size, class count, head
  and margin type, the head's storage dtype, queue size, precision). Refused; the message names every
  difference at once and points to `model.init_from`, which starts a new run from the checkpoint's backbone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from largefr.checkpoint.files import CheckpointError


class Rule(enum.Enum):
    FREE = "may change on resume"
    OPTIMIZER = "shapes the optimizer state"
    FIXED = "shapes the saved model state"


WHOLE_SECTION = ".*"
"""A table key ending so covers every key below it."""

RESUME_RULES: dict[str, Rule] = {
    # model
    "model.network": Rule.FIXED, "model.embedding_size": Rule.FIXED, "model.dropout": Rule.FREE,
    "model.activation_checkpointing": Rule.FREE, "model.drop_path_rate": Rule.FREE, "model.mask_ratio": Rule.FREE,
    "model.init_from": Rule.FREE,
    # data
    "data.num_classes": Rule.FIXED, "data.image_size": Rule.FIXED, "data.rec": Rule.FREE, "data.images": Rule.FREE,
    "data.cache_dir": Rule.FREE, "data.num_images": Rule.FREE, "data.loader": Rule.FREE, "data.val_targets": Rule.FREE,
    "data.num_workers": Rule.FREE, "data.shuffle_buffer": Rule.FREE, "data.random_flip": Rule.FREE,
    "data.on_bad_image": Rule.FREE, "data.synthetic": Rule.FREE,
    "data.augment.*": Rule.FREE,
    # head: the type decides the margin's running state; the values of the margins (every margin's settings,
    # so a new margin's fields need no line here), the sampling and the logits may change. A head key that
    # shapes saved state (the margin's type and form) is listed FIXED.
    "head.*": Rule.FREE, "head.type": Rule.FIXED, "head.elastic_form": Rule.FIXED,
    # the storage dtype of W, its optimizer rows and the bank: the restore reads the saved bytes straight into the
    # live rows (no cast on the way, so a resume's peak stays training plus one block), and a silent fp32 -> bf16
    # rounding of a run's state is not a resume
    "head.weight_dtype": Rule.FIXED,
    # cluster: the queue's length is saved; which parts exist is checked when they are loaded
    "cluster.queue_size": Rule.FIXED, "cluster.cg_margin": Rule.FREE, "cluster.lambda_range": Rule.FREE,
    "cluster.contrastive_weight": Rule.FREE, "cluster.contrastive_type": Rule.FREE,
    "cluster.triplet_margin": Rule.FREE, "cluster.aligning_weight": Rule.FREE, "cluster.encoder_momentum": Rule.FREE,
    "cluster.bank_momentum": Rule.FREE, "cluster.num_sampled_centers": Rule.FREE, "cluster.alpha": Rule.FREE,
    "cluster.temperature_mode": Rule.FREE, "cluster.contrastive_tau_init": Rule.FREE, "cluster.pcl_tau0": Rule.FREE,
    "cluster.pcl_clip_percentiles": Rule.FREE, "cluster.align_tau_init": Rule.FREE, "cluster.warmup_steps": Rule.FREE,
    # optim
    "optim.name": Rule.OPTIMIZER, "optim.momentum": Rule.OPTIMIZER, "optim.lr": Rule.FREE,
    "optim.weight_decay": Rule.FREE, "optim.betas": Rule.FREE, "optim.head_lr": Rule.FREE,
    "optim.head_grad_clip": Rule.FREE, "optim.gradient_clipping": Rule.FREE,
    # train
    "train.precision": Rule.FIXED, "train.batch_size": Rule.FREE, "train.gradient_accumulation_steps": Rule.FREE,
    "train.max_steps": Rule.FREE, "train.seed": Rule.FREE, "train.world": Rule.FREE, "train.zero_stage": Rule.FREE,
    "train.on_nonfinite": Rule.FREE, "train.max_consecutive_nonfinite": Rule.FREE,
    "train.collective_timeout_s": Rule.FREE, "train.hang_timeout_s": Rule.FREE, "train.overlap_reduction": Rule.FREE,
    "train.debug_inject_nan_steps": Rule.FREE,
    "train.debug_inject_nan_rank": Rule.FREE, "train.deterministic": Rule.FREE, "train.compile": Rule.FREE,
    "train.compile_backend": Rule.FREE, "train.channels_last": Rule.FREE, "train.freeze_backbone_steps": Rule.FREE,
    # whole sections
    "schedule.*": Rule.FREE, "eval.*": Rule.FREE, "checkpoint.*": Rule.FREE, "logging.*": Rule.FREE,
    "deepspeed": Rule.FREE, "output": Rule.FREE,
}
"""Config key (dotted) or section ('name.*') -> its rule on resume. Every key of the config is covered
(tests/test_fault_resume_config.py checks it), so a new key must be placed here."""

LEAF_SECTIONS = ("deepspeed", "data.synthetic")
"""Keys holding a free-form dict (or null), compared as one value."""


def _momentum_buffer_changes(old: Any, new: Any, saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    sgd = saved.get("optim.name") == "sgd" or current.get("optim.name") == "sgd"
    return sgd and (old == 0) != (new == 0)


MATTERS_WHEN: dict[str, Callable[[Any, Any, Mapping[str, Any], Mapping[str, Any]], bool]] = {
    "optim.momentum": _momentum_buffer_changes,
}
"""A rule that applies only to some changes of its key (else: to any change)."""


def rule_of(key: str) -> Rule | None:
    """The rule of dotted `key`: its own entry, else that of the nearest section written 'name.*'."""
    if key in RESUME_RULES:
        return RESUME_RULES[key]
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        section = ".".join(parts[:end]) + WHOLE_SECTION
        if section in RESUME_RULES:
            return RESUME_RULES[section]
    return None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a config dict (`Config.to_dict()`)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in LEAF_SECTIONS:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


@dataclass(frozen=True)
class Difference:
    key: str
    saved: Any
    current: Any
    rule: Rule

    def __str__(self) -> str:
        return f"{self.key}={self.saved!r}, this run has {self.current!r}"

    def change(self) -> str:
        return f"{self.key} {self.saved!r} -> {self.current!r}"


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Difference]:
    """Every key whose value differs, with its rule (a key the checkpoint does not record is not compared).

    An unclassified key counts as FIXED: refusing is safe, loading a state that does not fit is not.
    """
    old, new = flatten(saved), flatten(current)
    found = []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key]:
            continue
        rule = rule_of(key) or Rule.FIXED
        if rule is not Rule.FREE and key in MATTERS_WHEN and not MATTERS_WHEN[key](old[key], new[key], old, new):
            rule = Rule.FREE
        found.append(Difference(key, old[key], new[key], rule))
    return found


def check_resume_config(path: str, saved: Mapping[str, Any], current: Mapping[str, Any], *,
                        reset_optimizer: bool) -> list[Difference]:
    """Raise naming every difference that cannot be resumed; return those that may (to be logged)."""
    found = differences(saved, current)
    fixed = [d for d in found if d.rule is Rule.FIXED]
    optimizer = [d for d in found if d.rule is Rule.OPTIMIZER]
    problems = []
    if fixed:
        problems.append(f"{'; '.join(map(str, fixed))} ({Rule.FIXED.value}: resume with the values it was written "
                        f"with, or start a new run from its backbone with --set model.init_from={path})")
    if optimizer and not reset_optimizer:
        problems.append(f"{'; '.join(map(str, optimizer))} ({Rule.OPTIMIZER.value}: resume with the values it was "
                        "written with, or add --set checkpoint.reset_optimizer=true to keep the weights and start "
                        "the optimizer state afresh)")
    if problems:  # "was written with KEY=OLD, this run has NEW": one phrase for every difference
        raise CheckpointError(f"checkpoint {path} was written with {' and with '.join(problems)}")
    return [d for d in found if d.rule is not Rule.FIXED]
