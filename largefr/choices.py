"""The closed sets of values of the config, and its fixed rule tables: declared once, imported everywhere.

A leaf module (it imports nothing of largefr), so the config, its validation and every room (data,
heads, train, perf, the tools' argparse choices, the tests) import the same declaration. Each
`Literal` alias types a config field; the tuple beside it, read from the alias, is what code checks
and lists.
"""
from __future__ import annotations

import typing
from typing import Literal

# ---------------------------------------------------------------------------- data
LoaderKind = Literal["dali", "torch", "synthetic"]
LOADER_KINDS: tuple[str, ...] = typing.get_args(LoaderKind)
"""data.loader choices."""
RECORD_LOADER_KINDS: tuple[str, ...] = tuple(kind for kind in LOADER_KINDS if kind != "synthetic")
"""The loaders that read data.rec (the synthetic one makes random tensors)."""
BadImagePolicy = Literal["error", "skip"]
BAD_IMAGE_POLICIES: tuple[str, ...] = typing.get_args(BadImagePolicy)
"""data.on_bad_image choices: what the index scan, the loaders and the packer do with an image they cannot read."""
AUGMENT_OPERATORS = ("crop", "downscale", "erase", "mask", "jitter", "grayscale", "blur", "jpeg")
"""The augmentation operators in the order both loaders apply them (each has a <name>_prob field):
geometry first, then occlusion (so lighting, blur and compression also affect the occluder), then
photometric changes, compression last as in a re-saved photo."""

# ---------------------------------------------------------------------------- precision
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
"""train.precision choices; bf16/fp16 turn on DeepSpeed's section of that name."""
LogitsDtype = Literal["fp32", "bf16"]
LOGITS_DTYPES: tuple[str, ...] = typing.get_args(LogitsDtype)
"""head.logits_dtype choices (the memory planner's logits precisions)."""
WeightDtype = Literal["fp32", "bf16"]
WEIGHT_DTYPES: tuple[str, ...] = typing.get_args(WeightDtype)
"""head.weight_dtype choices: the storage precision of the class-sized state (W, its optimizer rows, the bank's
centers); the sampled rows are always computed in float32."""
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Precision name -> torch dtype attribute name (``getattr(torch, ...)``; torch is not imported here)."""
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Precision name -> bytes per element."""

# ---------------------------------------------------------------------------- head and cluster terms
FixedMargin = Literal["arcface", "cosface", "combined"]
MARGIN_TYPES: tuple[str, ...] = typing.get_args(FixedMargin)
"""head.type choices with a fixed margin (largefr/heads/margins/fixed.py)."""
AdaptiveMargin = Literal["curricularface", "magface", "adaface", "elasticface"]
ADAPTIVE_MARGIN_TYPES: tuple[str, ...] = typing.get_args(AdaptiveMargin)
"""head.type choices whose margin comes each step from running statistics, feature norms or random draws
(one class each in largefr/heads/margins/)."""
ElasticForm = Literal["arc", "cos"]
ELASTIC_FORMS: tuple[str, ...] = typing.get_args(ElasticForm)
"""head.elastic_form choices."""
HeadInit = Literal["random", "class_mean"]
HEAD_INITS: tuple[str, ...] = typing.get_args(HeadInit)
"""head.init choices."""
ContrastiveType = Literal["cluster", "center", "triplet"]
CONTRASTIVE_TYPES: tuple[str, ...] = typing.get_args(ContrastiveType)
"""cluster.contrastive_type choices: L_con (Eq. 6) or one of the paper's Table 3 baselines in its place."""
TemperatureMode = Literal["pcl", "raw", "learnable"]
TEMPERATURE_MODES: tuple[str, ...] = typing.get_args(TemperatureMode)
"""cluster.temperature_mode choices."""
PHI_TEMPERATURE_MODES: tuple[str, ...] = tuple(mode for mode in TEMPERATURE_MODES if mode != "learnable")
"""The temperature modes computed from phi (`largefr.heads.cluster_losses.cluster_temperature`); 'learnable'
is a parameter of the head instead."""

# ---------------------------------------------------------------------------- optimizer, schedule, loop
OptimizerName = Literal["adam", "adamw", "sgd"]
OPTIMIZER_NAMES: tuple[str, ...] = typing.get_args(OptimizerName)
"""optim.name choices (the backbone's torch optimizer)."""
HEAD_OPTIMIZERS = {"sgd": "sgd", "adam": "adamw", "adamw": "adamw"}
"""optim.name -> the head's row-sparse optimizer (RowSparseSGD, or RowSparseAdamW with decoupled weight decay
for both Adams); the memory planner's optimizer choices."""
ScheduleType = Literal["step", "poly"]
SCHEDULE_TYPES: tuple[str, ...] = typing.get_args(ScheduleType)
"""schedule.type choices."""
ScheduleUnit = Literal["epoch", "step"]
SCHEDULE_UNITS: tuple[str, ...] = typing.get_args(ScheduleUnit)
"""schedule.unit choices."""
NonFinitePolicy = Literal["skip", "abort"]
NONFINITE_POLICIES: tuple[str, ...] = typing.get_args(NonFinitePolicy)
"""train.on_nonfinite choices."""
ZERO_STAGES = (0, 1, 2)
"""train.zero_stage choices: ZeRO-3 would partition the backbone's parameters, which the momentum encoder
and checkpoint export need whole on every rank."""

DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.batch_size (global = batch_size x accumulation x world size)",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "optimizer": "optim.name, optim.lr, optim.weight_decay, ... (largefr builds the optimizer)",
    "scheduler": "schedule.type, schedule.epochs, schedule.warmup, ... (largefr sets the learning rates each step)",
    "gradient_clipping": "optim.gradient_clipping",
    "fp16.enabled": "train.precision",
    "bf16.enabled": "train.precision",
    "amp": "train.precision (apex amp is not used)",
    "zero_optimization.stage": "train.zero_stage",
}
"""Dotted DeepSpeed keys largefr writes from its own keys (value: the largefr keys to set instead); the
``deepspeed`` section may not set them, a second source would disagree. The rest of a named section
(fp16.initial_scale_power, zero_optimization.overlap_comm) is the user's."""
