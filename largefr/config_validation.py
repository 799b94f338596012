"""Value rules of largefr configs, and the error that lists every problem at once.

Each section's rules return (key, problem) pairs instead of raising, so that one ``ConfigError``
can list every problem of a config (the litgpt ``validate_args`` way). Sections are known by duck
typing (their ``section`` name), so ``largefr.config`` can import this module; the choice lists and rule
tables both use come from ``largefr.choices``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from largefr.choices import AUGMENT_OPERATORS, DEEPSPEED_OWNED_KEYS, ZERO_STAGES
from largefr.errors import UserError

Issue = tuple[str, str]
"""(dotted key path, what is wrong and what to do)."""

BATCHNORM_MIN_BATCH = 2
"""Smallest per-rank batch a BatchNorm layer can train on: it normalises with the batch's own statistics,
and one image has none (every largefr backbone ends in a BatchNorm1d embedding layer)."""


class ConfigError(UserError, ValueError):
    """Every problem of a config, one per line, each naming its source file and key path."""

    def __init__(self, issues: Iterable[Issue], source: str = "<python>",
                 origins: Mapping[str, str] | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        self.lines = [f"{_origin(key, source, origins or {})}: {key}: {message}"
                      for key, message in self.issues]
        count = len(self.lines)
        header = f"{count} problem{'s' if count != 1 else ''} in configuration {source}:"
        super().__init__("\n".join([header, *self.lines]))


def _origin(key: str, source: str, origins: Mapping[str, str]) -> str:
    """Where a key's value came from: the longest ``--set`` key covering it, else the file."""
    covering = [k for k in origins if key == k or key.startswith((k + ".", k + "["))]
    return origins[max(covering, key=len)] if covering else source


# ---------------------------------------------------------------------------- values

Check = tuple[str, "str | None"]
"""(key inside the section, problem text or None when fine)."""


def _min(value: float, low: float) -> str | None:
    return None if value >= low else f"must be >= {low}, got {value}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _fraction(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value}"


def _pair(values: Sequence[float], low: float, high: float) -> str | None:
    if len(values) != 2:
        return f"must hold exactly 2 numbers [low, high], got {len(values)}"
    if not low <= values[0] <= values[1] <= high:
        return f"must satisfy {low} <= low <= high <= {high}, got {list(values)}"
    return None


def _nonempty(text: str | None) -> str | None:
    empty = text is not None and not text.strip()
    return "must not be empty (use null to unset it)" if empty else None


def _nonempty_paths(paths: str | list[str] | None) -> str | None:
    if isinstance(paths, list):
        return "must name at least one folder or .rec file" if not paths else next(
            (problem for problem in map(_nonempty, paths) if problem), None)
    return _nonempty(paths)


def _data_checks(d: Any) -> list[Check]:
    reads_rec = d.loader != "synthetic" and not (d.synthetic and d.synthetic.cache_dir)
    repeated = sorted({t for t in d.val_targets if d.val_targets.count(t) > 1})
    checks = [
        ("rec", "required: the folder holding train.rec, train.idx and property (or set data.images, "
                "data.synthetic.cache_dir, or data.loader 'synthetic')"
         if reads_rec and d.rec is None and d.images is None else _nonempty_paths(d.rec)),
        ("images", "give data.rec or data.images, not both" if d.rec is not None and d.images is not None
         else _nonempty(d.images)),
        ("cache_dir", _nonempty(d.cache_dir)),
        ("num_classes", None if d.num_classes is None else _min(d.num_classes, 1)),
        ("num_images", _counts_problem(d.num_classes, d.num_images, d.loader)),
        ("val_targets", f"listed twice: {repeated}" if repeated else
         ("names must not be empty" if not all(t.strip() for t in d.val_targets) else None)),
        ("image_size", None if d.image_size > 0 and d.image_size % 16 == 0 else
         f"must be a positive multiple of 16 (backbones downsample 16x; insightface crops are "
         f"112), got {d.image_size}"),
        ("num_workers", _min(d.num_workers, 0)),
        ("shuffle_buffer", _min(d.shuffle_buffer, 1)),
    ]
    synthetic = d.synthetic
    if synthetic is not None and d.rec is None and d.images is None and d.loader != "synthetic":
        images = synthetic.identities * synthetic.images_per_identity
        checks += [
            ("num_classes", None if d.num_classes in (None, synthetic.identities) else
             f"must equal data.synthetic.identities ({synthetic.identities}), got {d.num_classes}"),
            ("num_images", None if d.num_images in (None, images) else
             f"must equal identities x images_per_identity of data.synthetic ({images}), "
             f"got {d.num_images}"),
        ]
    return checks


def _counts_problem(num_classes: int | None, num_images: int | None, loader: str) -> str | None:
    """data.num_images against data.num_classes; both are required by the synthetic loader (no data to count)."""
    if loader == "synthetic" and (num_classes is None or num_images is None):
        return "data.num_classes and data.num_images are required with data.loader 'synthetic' (no data to count)"
    if num_images is None or num_classes is None:
        return None
    return None if num_images >= max(num_classes, 1) else \
        f"must be >= data.num_classes ({num_classes}): every identity has an image, got {num_images}"


def _synthetic_checks(s: Any) -> list[Check]:
    return [("identities", _min(s.identities, 2)),
            ("images_per_identity", _min(s.images_per_identity, 1)),
            ("val_pairs", _min(s.val_pairs, 2) or ("" if s.val_pairs % 2 == 0
                                                    else f"must be an even number (half same-identity pairs), got {s.val_pairs}")),
            ("seed", _min(s.seed, 0)),
            ("heldout_identities", None if s.heldout_identities == 0 or s.heldout_identities >= 2 else
             f"must be 0 (no held-out folder) or >= 2 (identities to cluster), got {s.heldout_identities}"),
            ("heldout_images_per_identity", _min(s.heldout_images_per_identity, 0)),
            ("cache_dir", _nonempty(s.cache_dir))]


def _probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be a probability in [0, 1], got {value}"


def _range(values: Sequence[float], low: float, high: float, *, open_low: bool = False) -> str | None:
    """[low, high] of an augmentation parameter inside [low, high] (or (low, high] with `open_low`)."""
    problem = _pair(values, low, high)
    if problem is None and open_low and values[0] <= low:
        problem = f"must satisfy {low} < low <= high <= {high}, got {list(values)}"
    return problem


def _color(values: Sequence[int]) -> str | None:
    ok = len(values) == 3 and all(0 <= v <= 255 for v in values)
    return None if ok else f"must be [R, G, B] with each value in [0, 255], got {list(values)}"


def _augment_checks(a: Any) -> list[Check]:
    checks = [(f"{name}_prob", _probability(getattr(a, f"{name}_prob"))) for name in AUGMENT_OPERATORS]
    unchanged = [a.brightness, a.contrast, a.saturation] == [[1.0, 1.0]] * 3 and list(a.hue) == [0.0, 0.0]
    if a.jitter_prob > 0 and unchanged:
        checks.append(("jitter_prob", "the jitter would change nothing: brightness, contrast and saturation are "
                                      "[1, 1] and hue [0, 0]; give one of them a range or set jitter_prob 0"))
    return checks + [
        ("crop_scale", _range(a.crop_scale, 0.0, 1.0, open_low=True)),
        ("crop_ratio", _range(a.crop_ratio, 0.0, math.inf, open_low=True)),
        ("downscale_range", _range(a.downscale_range, 0.0, 1.0, open_low=True)),
        ("brightness", _range(a.brightness, 0.0, math.inf)),
        ("contrast", _range(a.contrast, 0.0, math.inf)),
        ("saturation", _range(a.saturation, 0.0, math.inf)),
        ("hue", _range(a.hue, -180.0, 180.0)),
        ("blur_sigma", _range(a.blur_sigma, 0.0, math.inf, open_low=True)),
        ("jpeg_quality", _range(a.jpeg_quality, 1, 100)),
        ("erase_area", _range(a.erase_area, 0.0, 1.0, open_low=True)),
        ("erase_ratio", _range(a.erase_ratio, 0.0, math.inf, open_low=True)),
        ("erase_fill", _color(a.erase_fill)),
        ("mask_top", _range(a.mask_top, 0.0, 1.0) or (
            None if a.mask_top[1] < 1.0 else f"high must be < 1 (the mask needs a row), got {a.mask_top}")),
        ("mask_width", _range(a.mask_width, 0.0, 1.0, open_low=True)),
        ("mask_fill", _color(a.mask_fill)),
    ]


def _vit_rate(network: str, value: float | None) -> str | None:
    if value is None:
        return None
    if not network.startswith("vit_"):
        return f"applies to the ViT backbones only (model.network={network}); remove it or set it to null"
    return _fraction(value)


def _model_checks(m: Any) -> list[Check]:
    return [("embedding_size", _min(m.embedding_size, 1)), ("dropout", _fraction(m.dropout)),
            ("drop_path_rate", _vit_rate(m.network, m.drop_path_rate)),
            ("mask_ratio", _vit_rate(m.network, m.mask_ratio)),
            ("init_from", _nonempty(m.init_from))]


def _combined_margins_problem(margins: Sequence[float]) -> str | None:
    if len(margins) != 3:
        return f"must hold 3 numbers [m1, m2, m3], got {len(margins)}"
    m1, m2, m3 = margins
    return None if m1 > 0 and 0 <= m2 < math.pi and m3 >= 0 else \
        f"needs m1 > 0, 0 <= m2 < pi and m3 >= 0, got {list(margins)}"


def margin_checks(m: Any) -> list[Check]:
    """The value rules of the head section's margin fields (the only place they are declared: HeadConfig)."""
    return [
        ("scale", _positive(m.scale)),
        ("margin", None if 0 <= m.margin < math.pi else f"must be in [0, pi), got {m.margin}"),
        ("combined_margins", _combined_margins_problem(m.combined_margins)),
        ("curricular_momentum", None if 0 < m.curricular_momentum <= 1 else
         f"must be in (0, 1], got {m.curricular_momentum}"),
        ("magface_l_a", _positive(m.magface_l_a)),
        ("magface_u_a", None if m.magface_u_a > m.magface_l_a else
         f"must be > head.magface_l_a ({m.magface_l_a}), got {m.magface_u_a}"),
        ("magface_l_margin", _min(m.magface_l_margin, 0.0)),
        ("magface_u_margin", None if m.magface_l_margin <= m.magface_u_margin < math.pi else
         f"must be in [head.magface_l_margin, pi) = [{m.magface_l_margin}, pi), got {m.magface_u_margin}"),
        ("magface_lambda_g", _min(m.magface_lambda_g, 0.0)),
        ("adaface_margin", None if 0 <= m.adaface_margin < math.pi / 2 else
         f"must be in [0, pi/2), got {m.adaface_margin}"),
        ("adaface_h", _positive(m.adaface_h)),
        ("adaface_t_alpha", None if 0 < m.adaface_t_alpha <= 1 else f"must be in (0, 1], got {m.adaface_t_alpha}"),
        ("elastic_margin", None if m.elastic_margin is None or 0 <= m.elastic_margin < math.pi else
         f"must be in [0, pi) (or null: the paper's), got {m.elastic_margin}"),
        ("elastic_std", None if m.elastic_std is None else _min(m.elastic_std, 0.0)),
    ]


def _head_checks(h: Any) -> list[Check]:
    return margin_checks(h) + [
        ("sample_rate", None if 0 < h.sample_rate <= 1 else
         f"must be in (0, 1] (1.0 uses every class), got {h.sample_rate}"),
        ("chunk_size", _min(h.chunk_size, 0)),
        ("init_std", _positive(h.init_std)),
    ]


def _cluster_checks(c: Any) -> list[Check]:
    return [
        ("lambda_range", _pair(c.lambda_range, 0.0, math.inf)),
        ("contrastive_weight", _min(c.contrastive_weight, 0.0)),
        ("aligning_weight", _min(c.aligning_weight, 0.0)),
        ("queue_size", _min(c.queue_size, 1)),
        ("encoder_momentum", _fraction(c.encoder_momentum)),
        ("bank_momentum", _fraction(c.bank_momentum)),
        ("num_sampled_centers", _min(c.num_sampled_centers, 1)),
        ("alpha", _positive(c.alpha)),
        ("pcl_tau0", _positive(c.pcl_tau0)),
        ("pcl_clip_percentiles", _pair(c.pcl_clip_percentiles, 0.0, 100.0)),
        ("align_tau_init", _positive(c.align_tau_init)),
        ("triplet_margin", _min(c.triplet_margin, 0.0)),
        ("contrastive_tau_init", _positive(c.contrastive_tau_init)),
        ("warmup_steps", _min(c.warmup_steps, 0)),
    ]


def _optim_checks(o: Any) -> list[Check]:
    return [
        ("lr", _positive(o.lr)),
        ("momentum", _fraction(o.momentum)),
        ("weight_decay", _min(o.weight_decay, 0.0)),
        ("betas", f"must hold 2 numbers in [0, 1), got {o.betas}"
         if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas) else None),
        ("head_lr", None if o.head_lr is None else _positive(o.head_lr)),
        ("head_grad_clip", _min(o.head_grad_clip, 0.0)),
        ("gradient_clipping", _min(o.gradient_clipping, 0.0)),
    ]


def _schedule_checks(s: Any) -> list[Check]:
    in_epochs = s.unit == "epoch"
    late = [m for m in s.milestones if in_epochs and m >= s.epochs]
    return [
        ("epochs", _positive(s.epochs)),
        ("warmup", _min(s.warmup, 0.0) or (
            f"must be < schedule.epochs ({s.epochs}), got {s.warmup}"
            if in_epochs and s.warmup > 0 and s.warmup >= s.epochs else None)),
        ("milestones", "must be strictly increasing and > 0, got " + str(s.milestones)
         if not all(a < b for a, b in zip([0, *s.milestones], s.milestones, strict=False)) else
         f"{late} would never apply: must be < schedule.epochs ({s.epochs})" if late else None),
        ("gamma", _positive(s.gamma)),
        ("power", _min(s.power, 0.0)),
    ]


def _zero_stage_problem(stage: int) -> str | None:
    stages = ", ".join(map(str, ZERO_STAGES))
    if stage == 3:
        return ("ZeRO-3 is not supported yet: it partitions the backbone's parameters across ranks, but the "
                "momentum encoder and checkpoint export need full parameters on every rank; use "
                f"train.zero_stage {stages} (ZeRO-2 already partitions optimizer state and gradients)")
    return None if stage in ZERO_STAGES else f"must be one of {stages}, got {stage}"


def _train_checks(t: Any) -> list[Check]:
    return [
        ("batch_size", _min(t.batch_size, 1)),
        ("gradient_accumulation_steps", _min(t.gradient_accumulation_steps, 1)),
        ("max_steps", None if t.max_steps is None else _min(t.max_steps, 1)),
        ("seed", _min(t.seed, 0)),
        ("zero_stage", _zero_stage_problem(t.zero_stage)),
        ("max_consecutive_nonfinite", _min(t.max_consecutive_nonfinite, 1)),
        ("hang_timeout_s", _min(t.hang_timeout_s, 0.0)),
        ("compile_backend", _nonempty(t.compile_backend)),
    ]


SECTION_CHECKS = {
    "data": _data_checks, "data.synthetic": _synthetic_checks, "data.augment": _augment_checks,
    "model": _model_checks,
    "head": _head_checks, "cluster": _cluster_checks, "optim": _optim_checks,
    "schedule": _schedule_checks, "train": _train_checks,
    "eval": lambda e: [("every", _min(e.every, 0)), ("batch_size", _min(e.batch_size, 1)),
                       ("nfolds", _min(e.nfolds, 2))],
    "checkpoint": lambda c: [("every", _min(c.every, 0)), ("keep_last", _min(c.keep_last, 1)),
                             ("resume", _nonempty(c.resume)), ("dir", _nonempty(c.dir))],
    "logging": lambda g: [("every", _min(g.every, 1))],
}


def section_issues(section: Any) -> list[Issue]:
    """Value problems of one config section (``section.section`` names it)."""
    name = section.section
    return [(f"{name}.{key}", problem)
            for key, problem in SECTION_CHECKS[name](section) if problem]


def _owned_deepspeed_keys(deepspeed: Mapping[str, Any]) -> Iterator[str]:
    """The keys of DEEPSPEED_OWNED_KEYS that the user's deepspeed section sets."""
    for dotted in DEEPSPEED_OWNED_KEYS:
        node: Any = deepspeed
        for part in dotted.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            yield dotted


def config_issues(config: Any) -> list[Issue]:
    """Problems that involve more than one section (world size unknown)."""
    issues = [(f"deepspeed.{key}", "set by the trainer; remove it and set "
               f"{DEEPSPEED_OWNED_KEYS[key]} instead")
              for key in _owned_deepspeed_keys(config.deepspeed)]
    if not config.output.strip():
        issues.append(("output", "must not be empty: the run folder"))
    if config.head.init == "class_mean" and config.model.init_from is None:
        issues.append(("head.init", "'class_mean' needs model.init_from (class means of a random backbone say "
                       "nothing); set model.init_from or head.init=random"))
    if config.train.batch_size == 1:
        issues.append(("train.batch_size", f"1 image per rank cannot train model.network={config.model.network}: "
                       "its BatchNorm layers normalise with the statistics of the rank's own batch, which one "
                       f"image does not have; use train.batch_size >= {BATCHNORM_MIN_BATCH} (raise "
                       "train.gradient_accumulation_steps instead to keep a small memory footprint)"))
    if config.train.freeze_backbone_steps < 0:
        issues.append(("train.freeze_backbone_steps", f"must be >= 0, got {config.train.freeze_backbone_steps}"))
    return issues + world_size_issues(config, 1)


def world_size_issues(config: Any, world_size: int) -> list[Issue]:
    """Problems that depend on the number of ranks."""
    issues: list[Issue] = []
    data, batch = config.data, config.train.batch_size * world_size
    ranks = f" x world size {world_size}" if world_size > 1 else ""
    if world_size > 1 and data.num_classes is not None and data.num_classes < world_size:
        issues.append(("data.num_classes", f"{data.num_classes} is smaller than the world size "
                       f"({world_size}): every rank must own at least one class; use fewer ranks"))
    if data.num_images is not None and data.num_images < batch:
        issues.append(("data.num_images", f"{data.num_images} images give no full batch of "
                       f"train.batch_size {config.train.batch_size}{ranks} (the last incomplete "
                       "batch is dropped); lower train.batch_size"))
    if config.cluster.enabled and config.cluster.queue_size < batch:
        issues.append(("cluster.queue_size", f"{config.cluster.queue_size} cannot hold one global "
                       f"batch (train.batch_size {config.train.batch_size}{ranks}); raise it"))
    return issues
