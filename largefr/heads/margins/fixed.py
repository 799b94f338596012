"""The fixed margins: ArcFace, CosFace and the combined margin, stateless `Margin`s (CG-ArcFace's lambda included).

All three are one function of the target cosine c = cos(theta):

    psi(c) = cos(m1*theta + m2) - m3          while m1*theta + m2 <= pi
    logit  = s * psi(c)   for the target column,   s * c   for every other column

ArcFace is (m1, m2, m3) = (1, m, 0), CosFace is (1, 0, m), the combined margin takes (m1, m2, m3)
from head.combined_margins. CG-ArcFace scales the margin per row by lambda_{y_i} (the lambda of the
row's target class): m2_i = lambda_i * m2 and m3_i = lambda_i * m3 (m1 is not scaled). For ArcFace
that is exactly s*cos(theta + lambda_y*m); for CosFace s*(cos - lambda_y*m). Because the margin is
per row, the switch point below is per row too.

The gradient is exact: for m1 == 1 we compute cos(theta + m2) = c*cos(m2) - sin(theta)*sin(m2) with
sin(theta) = sqrt(1 - c^2) (clamped away from 0 so the derivative stays finite), which is
differentiable in c (no straight-through estimator); for m1 != 1 through acos (clamped to (-1, 1)).

theta + m > pi. Past theta* = (pi - m2)/m1 the angle m1*theta + m2 exceeds pi and cos(.) would
increase again, rewarding a worse target. Two documented fallbacks (`angular_psi`):

* default ("th/mm" form of insightface): for theta > theta*, psi = c - (pi - theta*)*sin(theta*) - m3,
  the tangent continuation. For ArcFace this is insightface's cos(theta) - m*sin(m) with the switch
  at cos(theta) = cos(pi - m). psi is NOT continuous at theta*: it jumps DOWN by
  cos(m) + m*sin(m) - 1 (ArcFace, m = 0.5: from -1 to -1.117), so the target logit stays
  monotone decreasing in theta (for theta* >= pi/2, i.e. any practical margin). The derivative
  on both sides is finite; autograd uses the branch the sample falls in.
* head.easy_margin: the margin is applied only where c > 0, psi = c elsewhere (insightface's
  easy_margin; continuous at c = 0 only when the margin vanishes there).
"""
from __future__ import annotations

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import REGISTRY, Margin, MarginBatch, MarginStep, angular_psi


class FixedMargin(Margin):
    """A margin of the combined form (m1, m2, m3), scaled per row by the cluster-guided lambda; no state."""

    @staticmethod
    def combined_form(config: HeadConfig) -> tuple[float, float, float]:
        """(m1, m2, m3) of the combined form that this margin is, from the head section."""
        raise NotImplementedError

    def step(self, batch: MarginBatch) -> MarginStep:
        return MarginStep(params=batch.row_lambda)

    def target_logit(self, cos: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        return target_logit(cos, self.config, params)


class ArcFace(FixedMargin, name="arcface"):
    """s*cos(theta + m) (Deng et al. 2019)."""

    @staticmethod
    def combined_form(config: HeadConfig) -> tuple[float, float, float]:
        return 1.0, float(config.margin), 0.0


class CosFace(FixedMargin, name="cosface"):
    """s*(cos(theta) - m) (Wang et al. 2018)."""

    @staticmethod
    def combined_form(config: HeadConfig) -> tuple[float, float, float]:
        return 1.0, 0.0, float(config.margin)


class CombinedMargin(FixedMargin, name="combined"):
    """s*(cos(m1*theta + m2) - m3) (insightface's combined margin)."""

    @staticmethod
    def combined_form(config: HeadConfig) -> tuple[float, float, float]:
        m1, m2, m3 = config.combined_margins
        return float(m1), float(m2), float(m3)


def combined_form(config: HeadConfig) -> tuple[float, float, float]:
    """(m1, m2, m3) of a fixed head.type ('arcface', 'cosface' or 'combined')."""
    margin = REGISTRY.get(config.type)
    if margin is None or not issubclass(margin, FixedMargin):
        fixed = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, FixedMargin))
        raise ValueError(f"head.type {config.type!r} is not a fixed margin; the combined form exists for {fixed}")
    return margin.combined_form(config)


def target_logit(cos_target: torch.Tensor, config: HeadConfig, row_lambda: torch.Tensor | None = None) -> torch.Tensor:
    """s * psi(cos) of a fixed margin for target cosines (any shape); row_lambda scales m2 and m3 per element.

    row_lambda: the lambda of each element's target class (same shape as cos_target), treated as
    a constant; None means 1 (plain ArcFace / CosFace / combined).
    """
    m1, m2, m3 = combined_form(config)
    scale = torch.ones_like(cos_target) if row_lambda is None else row_lambda.to(cos_target.dtype)
    fallback = "easy" if config.easy_margin else "th_mm"
    return angular_psi(cos_target, m1, scale * m2, scale * m3, fallback) * config.scale


def margin_logits(
    cos: torch.Tensor, local_target: torch.Tensor, class_lambda: torch.Tensor | None, config: HeadConfig
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
    targets = target_logit(cos[rows, cols], config, row_lambda)
    return (cos * config.scale).index_put((rows, cols), targets)
