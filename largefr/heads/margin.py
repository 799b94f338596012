"""Additive-angular / cosine margins for the target logit (ArcFace, CosFace, combined, CG-ArcFace).

All three margins are one function of the target cosine c = cos(theta):

    psi(c) = cos(m1*theta + m2) - m3          while m1*theta + m2 <= pi
    logit  = s * psi(c)   for the target column,   s * c   for every other column

ArcFace is (m1, m2, m3) = (1, m, 0), CosFace is (1, 0, m), the combined margin takes (m1, m2, m3)
from the config. CG-ArcFace scales the margin per row by lambda_{y_i} (the lambda of the row's
target class): m2_i = lambda_i * m2 and m3_i = lambda_i * m3 (m1 is not scaled). For ArcFace that is
exactly s*cos(theta + lambda_y*m); for CosFace s*(cos - lambda_y*m). Because the margin is per row,
the switch point below is per row too.

The gradient is exact: for m1 == 1 we compute cos(theta + m2) = c*cos(m2) - sin(theta)*sin(m2) with
sin(theta) = sqrt(1 - c^2) (clamped away from 0 so the derivative stays finite), which is
differentiable in c (no straight-through estimator); for m1 != 1 through acos (clamped to (-1, 1)).

theta + m > pi. Past theta* = (pi - m2)/m1 the angle m1*theta + m2 exceeds pi and cos(.) would
increase again, rewarding a worse target. Two documented fallbacks:

* default ("th/mm" form of insightface): for theta > theta*, psi = c - (pi - theta*)*sin(theta*) - m3,
  the tangent continuation. For ArcFace this is insightface's cos(theta) - m*sin(m) with the switch
  at cos(theta) = cos(pi - m). psi is NOT continuous at theta*: it jumps DOWN by
  cos(m) + m*sin(m) - 1 (ArcFace, m = 0.5: from -1 to -1.117), so the target logit stays
  monotone decreasing in theta (for theta* >= pi/2, i.e. any practical margin). The derivative
  on both sides is finite; autograd uses the branch the sample falls in.
* easy_margin=True: the margin is applied only where c > 0, psi = c elsewhere (insightface's
  easy_margin; continuous at c = 0 only when the margin vanishes there).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from largefr.choices import ADAPTIVE_MARGIN_TYPES, ELASTIC_FORMS, MARGIN_TYPES
from largefr.config import HeadConfig
from largefr.config_validation import margin_checks

SIN_FLOOR = 1e-12
"""Floor of 1 - c^2, so d sqrt / dc stays finite at |c| = 1 (every margin that takes sin(theta))."""
NORM_EPS = 1e-12
"""Clamp of a norm before dividing by it (F.normalize's default): the same in every head and in the warm start."""
_ACOS_CLAMP = 1e-7  # keep acos away from +-1 where its derivative is infinite


_HEAD = HeadConfig()
"""MarginConfig's defaults (the papers' values) are declared once, by the run config's head section."""


@dataclass(kw_only=True)
class MarginConfig:
    """Which margin the target logit gets, and the logit scale."""

    type: str = _HEAD.type
    """'arcface' (s*cos(theta+m)), 'cosface' (s*(cos-m)), 'combined' (s*(cos(m1*theta+m2)-m3)), or one of
    ADAPTIVE_MARGIN_TYPES (see `largefr.heads.adaptive_margins`)."""
    scale: float = _HEAD.scale
    """Logit scale s applied to every logit."""
    margin: float = _HEAD.margin
    """m for 'arcface' (angular, radians), 'cosface' (cosine) and 'curricularface' (angular)."""
    combined_margins: tuple[float, float, float] = tuple(_HEAD.combined_margins)
    """(m1, m2, m3) for 'combined' (insightface's convention); lambda scales m2 and m3."""
    easy_margin: bool = _HEAD.easy_margin
    """Apply the margin only where cos(theta) > 0 instead of the th/mm fallback past pi."""
    curricular_momentum: float = _HEAD.curricular_momentum
    """CurricularFace: t <- momentum * mean target cosine + (1 - momentum) * t."""
    magface_l_a: float = _HEAD.magface_l_a
    """MagFace: lower bound l_a of the feature magnitude."""
    magface_u_a: float = _HEAD.magface_u_a
    """MagFace: upper bound u_a of the feature magnitude."""
    magface_l_margin: float = _HEAD.magface_l_margin
    """MagFace: margin at magnitude l_a."""
    magface_u_margin: float = _HEAD.magface_u_margin
    """MagFace: margin at magnitude u_a."""
    magface_lambda_g: float = _HEAD.magface_lambda_g
    """MagFace: weight of the magnitude regulariser g(a) = a / u_a^2 + 1 / a."""
    magface_easy_margin: bool = _HEAD.magface_easy_margin
    """MagFace: the margin only where cos > 0 (the authors' default); False: the th/mm fallback."""
    adaface_margin: float = _HEAD.adaface_margin
    """AdaFace: m."""
    adaface_h: float = _HEAD.adaface_h
    """AdaFace: h, the concentration of the normalised norm."""
    adaface_t_alpha: float = _HEAD.adaface_t_alpha
    """AdaFace: momentum of the running mean and std of the feature norms."""
    elastic_form: str = _HEAD.elastic_form
    """ElasticFace: 'arc' (angular margin) or 'cos' (cosine margin)."""
    elastic_margin: float | None = _HEAD.elastic_margin
    """ElasticFace: mean m of the margin draw; None: the paper's 0.5 (arc) or 0.35 (cos)."""
    elastic_std: float | None = _HEAD.elastic_std
    """ElasticFace: std of the draw; None: the paper's 0.05, or with elastic_sorted 0.0175 (arc) / 0.02 (cos)."""
    elastic_sorted: bool = _HEAD.elastic_sorted
    """ElasticFace+: sorted margins assigned by the target cosines' order (the authors' 'plus')."""

    def __post_init__(self) -> None:
        problems = [] if self.type in MARGIN_TYPES + ADAPTIVE_MARGIN_TYPES else \
            [f"type: must be one of {MARGIN_TYPES + ADAPTIVE_MARGIN_TYPES}, got {self.type!r}"]
        if self.elastic_form not in ELASTIC_FORMS:
            problems.append(f"elastic_form: must be one of {ELASTIC_FORMS}, got {self.elastic_form!r}")
        problems += [f"{key}: {problem}" for key, problem in margin_checks(self) if problem]
        if problems:
            raise ValueError("invalid MarginConfig: " + "; ".join(problems))

    @property
    def adaptive(self) -> bool:
        """True for the margins of `largefr.heads.adaptive_margins` (state or per-step inputs)."""
        return self.type in ADAPTIVE_MARGIN_TYPES

    def elastic_mean_std(self) -> tuple[float, float]:
        """ElasticFace's (m, sigma): the configured values, else the paper's for the form and variant."""
        mean = self.elastic_margin if self.elastic_margin is not None else (0.5 if self.elastic_form == "arc"
                                                                            else 0.35)
        if self.elastic_std is not None:
            return mean, self.elastic_std
        if not self.elastic_sorted:
            return mean, 0.05
        return mean, 0.0175 if self.elastic_form == "arc" else 0.02

    def margins(self) -> tuple[float, float, float]:
        """(m1, m2, m3) of the combined form that this config is."""
        if self.type == "arcface":
            return 1.0, self.margin, 0.0
        if self.type == "cosface":
            return 1.0, 0.0, self.margin
        m1, m2, m3 = self.combined_margins
        return float(m1), float(m2), float(m3)


ADAPTIVE_FIELD_PREFIXES = ("curricular_", "magface_", "adaface_", "elastic_")
"""MarginConfig fields of the adaptive margins; the run config's head section has the same names."""


def adaptive_margin_settings(source: object) -> dict:
    """The adaptive margins' fields of `source` (e.g. the config's head section), as MarginConfig keywords."""
    names = [f.name for f in dataclasses.fields(MarginConfig) if f.name.startswith(ADAPTIVE_FIELD_PREFIXES)]
    return {name: getattr(source, name) for name in names}


def _shifted_cosine(cos: torch.Tensor, m1: float, m2: torch.Tensor) -> torch.Tensor:
    """cos(m1*theta + m2), differentiable in cos."""
    if m1 == 1.0:
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN_FLOOR))
        return cos * torch.cos(m2) - sin * torch.sin(m2)
    theta = torch.acos(cos.clamp(-1.0 + _ACOS_CLAMP, 1.0 - _ACOS_CLAMP))
    return torch.cos(m1 * theta + m2)


def target_logit(
    cos_target: torch.Tensor, cfg: MarginConfig, row_lambda: torch.Tensor | None = None
) -> torch.Tensor:
    """s * psi(cos) for target cosines (any shape); row_lambda scales m2 and m3 per element.

    row_lambda: the lambda of each element's target class (same shape as cos_target), treated as
    a constant; None means 1 (plain ArcFace / CosFace / combined).
    """
    m1, m2, m3 = cfg.margins()
    scale = torch.ones_like(cos_target) if row_lambda is None else row_lambda.to(cos_target.dtype)
    m2_row, m3_row = scale * m2, scale * m3
    shifted = _shifted_cosine(cos_target, m1, m2_row) - m3_row
    if cfg.easy_margin:
        psi = torch.where(cos_target > 0, shifted, cos_target)
    else:
        # switch angle theta* where m1*theta + m2 reaches pi; never past pi itself
        switch_angle = ((math.pi - m2_row) / m1).clamp(max=math.pi)
        # the angle added at the switch point, (m1 - 1)*theta* + m2 = pi - theta*
        tangent_drop = math.pi - switch_angle
        fallback = cos_target - tangent_drop * torch.sin(switch_angle) - m3_row
        psi = torch.where(cos_target > torch.cos(switch_angle), shifted, fallback)
    return psi * cfg.scale


def margin_logits(
    cos: torch.Tensor, local_target: torch.Tensor, class_lambda: torch.Tensor | None, cfg: MarginConfig
) -> torch.Tensor:
    """Logits s*cos with each row's target column replaced by s*psi (out of place, differentiable).

    cos: (rows, cols); local_target: (rows,) column of the row's positive or -1 (none here);
    class_lambda: (cols,) lambda of each column's class, or None for lambda = 1.
    """
    if cos.dim() != 2 or local_target.shape != cos.shape[:1]:
        raise ValueError(f"margin_logits expects cos (rows, cols) and local_target (rows,), got "
                         f"{tuple(cos.shape)} and {tuple(local_target.shape)}")
    if class_lambda is not None and class_lambda.shape != cos.shape[1:]:
        raise ValueError(f"class_lambda has shape {tuple(class_lambda.shape)}, expected ({cos.shape[1]},)")
    rows = torch.nonzero(local_target >= 0).squeeze(1)
    cols = local_target[rows]
    row_lambda = None if class_lambda is None else class_lambda[cols]
    targets = target_logit(cos[rows, cols], cfg, row_lambda)
    return (cos * cfg.scale).index_put((rows, cols), targets)
