"""MagFace (Meng et al. 2021; the authors' models/magface.py::MagLinear, MagLoss and run/run.sh:
l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35, easy_margin = True).

a_i = ||f_i|| clamped to [l_a, u_a], m(a) = (u_m - l_m)/(u_a - l_a) * (a - l_a) + l_m, target
s*cos(theta + m_i) (margin only where c > 0 by default, as MagLinear), loss CE + lambda_g * mean_i
(a_i/u_a^2 + 1/a_i). The norm is NOT detached: the gradient reaches the embedding through the margin
and through g (zero outside [l_a, u_a], the clamp's), as in the original. m_i = lambda_i * m(a_i).
The mean of g runs over the valid rows of the global batch; each rank sums the rows whose class it
owns, so its backward carries only those. No running state.
"""
from __future__ import annotations

import torch

from largefr.distributed.collectives import sum_partials_across_ranks
from largefr.heads.margins.base import Margin, MarginBatch, MarginStep, arc_psi


class MagFace(Margin, name="magface"):
    """A margin growing with the feature magnitude, and a regulariser g(a) on the magnitude."""

    def step(self, batch: MarginBatch) -> MarginStep:
        cfg = self.config
        magnitude = batch.norms[batch.rows].clamp(cfg.magface_l_a, cfg.magface_u_a)  # keeps the gradient inside
        slope = (cfg.magface_u_margin - cfg.magface_l_margin) / (cfg.magface_u_a - cfg.magface_l_a)
        margin = (slope * (magnitude - cfg.magface_l_a) + cfg.magface_l_margin) * batch.lambdas()
        params = torch.stack([margin, torch.zeros_like(margin)], dim=1)
        regulariser = magnitude / cfg.magface_u_a ** 2 + 1.0 / magnitude
        count = (batch.labels >= 0).sum().clamp(min=1).to(batch.norms.dtype)
        mean_g = sum_partials_across_ranks(regulariser.sum() / count, batch.group)
        return MarginStep(params=params, extra_loss=cfg.magface_lambda_g * mean_g)

    def target_logit(self, cos, params):
        fallback = "easy" if self.config.magface_easy_margin else "th_mm"
        return self.scale * arc_psi(cos, params[:, 0].to(cos.dtype), fallback)
