"""CurricularFace (Huang et al. 2020; the authors' head/metrics.py::CurricularFace, m = 0.5, s = 64).

Target s*cos(theta + m_i) with insightface's th/mm fallback past pi (exactly our ArcFace), and every
negative with c_j > T_i = cos(theta_i + m_i) (the plain formula, no fallback, as the authors' mask)
becomes s*c_j*(t + c_j). t <- momentum * mean_i c_i + (1 - momentum) * t BEFORE its use in the step
(t starts at 0, head.curricular_momentum = 0.01), mean over the valid rows of the global batch (the
head's one all-reduce of the B_g target cosines, so every rank holds the same t); t is detached as in
the original (updated under no_grad), the modulation's gradient is t + 2 c_j. m_i = lambda_i * m.
"""
from __future__ import annotations

import math

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import Margin, MarginBatch, MarginStep, arc_psi

MODULATION_TILE = 1 << 16
"""Logits per tile of the hard-negative modulation: its six elementwise steps run on a tile while it is in
cache, and its temporaries (the tile's mask) come from the allocator's cache instead of fresh pages."""


class HardNegatives:
    """CurricularFace's modulation of one step: s*c -> s*c*(t + c) where c > threshold_i, off the targets."""

    def __init__(self, threshold: torch.Tensor, t: torch.Tensor, scale: float):
        self.threshold, self.t, self.scale = threshold, t, scale

    @torch.no_grad()
    def apply_(self, logits: torch.Tensor, target_rows: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
        """In place on logits (rows x cols, holding s*c; threshold (rows,), +inf: the row has none); returns the
        derivative of the new logits w.r.t. the old ones (t + 2c on hard negatives, 1 elsewhere), the exact
        backward multiplier. One pass over the logits, tile by tile; the targets are put back unchanged."""
        targets = logits[target_rows, target_cols]
        derivative = torch.empty_like(logits)
        bound = (self.threshold * self.scale).to(logits.dtype).unsqueeze(1)
        t_value = self.t.to(logits.dtype)
        rows, cols = logits.shape
        col_step = max(1, min(cols, MODULATION_TILE))
        row_step = max(1, MODULATION_TILE // col_step)
        for row in range(0, rows, row_step):
            for col in range(0, cols, col_step):
                tile = (slice(row, row + row_step), slice(col, col + col_step))
                _modulate_tile_(logits[tile], derivative[tile], bound[tile[0]], t_value, self.scale)
        logits[target_rows, target_cols] = targets
        derivative[target_rows, target_cols] = 1.0
        return derivative


def _modulate_tile_(logits: torch.Tensor, derivative: torch.Tensor, bound: torch.Tensor, t: torch.Tensor,
                    scale: float) -> None:
    """One tile: logits *= t + c where logits > bound (per row); derivative = t + 2c there, 1 elsewhere."""
    easy = logits <= bound
    factor = torch.add(t, logits, alpha=1.0 / scale, out=derivative).masked_fill_(easy, 1.0)  # t + c
    logits.mul_(factor)
    factor.mul_(2.0).sub_(t).masked_fill_(easy, 1.0)  # 2(t + c) - t = t + 2c


class CurricularFace(Margin, name="curricularface"):
    """The target as ArcFace's; hard negatives modulated by the running t (a buffer, in `margin_state`)."""

    needs_target_facts = True

    def __init__(self, config: HeadConfig, *, seed: int = 0, device: torch.device | None = None):
        super().__init__(config, seed=seed, device=device)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64, device=device))

    def step(self, batch: MarginBatch) -> MarginStep:
        target_cos, valid = batch.target_cos, batch.labels >= 0
        with torch.no_grad():
            self._remember()
            count = valid.sum()
            mean = torch.where(valid, target_cos, torch.zeros_like(target_cos)).sum() / count.clamp(min=1)
            momentum = self.config.curricular_momentum
            updated = momentum * mean.to(self.t.dtype) + (1.0 - momentum) * self.t
            self.t.copy_(torch.where(count > 0, updated, self.t))  # no host sync on the count
            row_margin = self.config.margin * batch.global_lambda.to(target_cos.dtype)
            threshold = arc_psi(target_cos, row_margin, "none")
            threshold = torch.where(valid, threshold, torch.full_like(threshold, math.inf))
        margin = self.config.margin * batch.lambdas()
        params = torch.stack([margin, torch.zeros_like(margin)], dim=1)
        return MarginStep(params=params, negatives=HardNegatives(threshold, self.t.clone(), self.scale))

    def target_logit(self, cos, params):
        return self.scale * arc_psi(cos, params[:, 0].to(cos.dtype), "th_mm")
