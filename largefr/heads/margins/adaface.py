"""AdaFace (Kim et al. 2022; the authors' head.py::AdaFace and main.py: m = 0.4, h = 0.333,
t_alpha = 0.01, eps = 1e-3, initial batch_mean 20, batch_std 100).

a = ||f|| clipped to [0.001, 100] and DETACHED (as the original: no gradient through the norm);
running mean/std of a (unbiased std over the valid rows of the global batch, every rank computes
them from the same gathered batch) updated before use; z = clip(h*(a - mean)/(std + eps), -1, 1);
g_angle = -m_i*z, g_add = m_i*(1 + z); target s*(cos(clip(acos(clip(c, -1+eps, 1-eps)) + g_angle,
eps, pi-eps)) - g_add) with the clips' zero gradients. m_i = lambda_i * m.
Deliberate difference: the original also clamps NON-target cosines to +-(1 - eps); the head does not
(it changes a logit only where a negative's cosine exceeds 0.999).
"""
from __future__ import annotations

import math

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import Margin, MarginBatch, MarginStep

ADAFACE_EPS = 1e-3  # the authors' self.eps: cosine clamp, angle clip and std offset
ADAFACE_NORM_CLIP = (0.001, 100.0)  # the authors' safe_norms clip


class AdaFace(Margin, name="adaface"):
    """An angular and an additive margin set by the norm's place in the running norm statistics (buffers)."""

    def __init__(self, config: HeadConfig, *, seed: int = 0, device: torch.device | None = None):
        super().__init__(config, seed=seed, device=device)
        self.register_buffer("batch_mean", torch.full((), 20.0, dtype=torch.float64, device=device))
        self.register_buffer("batch_std", torch.full((), 100.0, dtype=torch.float64, device=device))

    @torch.no_grad()
    def _update_statistics(self, safe_norms: torch.Tensor, valid: torch.Tensor) -> None:
        """Running mean and unbiased std of the valid rows' norms (needs >= 2 valid rows, else unchanged)."""
        self._remember()
        count = valid.sum()
        zeros = torch.zeros_like(safe_norms)
        mean = torch.where(valid, safe_norms, zeros).sum() / count.clamp(min=1)
        variance = torch.where(valid, (safe_norms - mean) ** 2, zeros).sum() / (count - 1).clamp(min=1)
        alpha = self.config.adaface_t_alpha
        enough = count > 1
        for buffer, value in ((self.batch_mean, mean), (self.batch_std, variance.sqrt())):
            buffer.copy_(torch.where(enough, alpha * value.to(buffer.dtype) + (1.0 - alpha) * buffer, buffer))

    def step(self, batch: MarginBatch) -> MarginStep:
        norms = batch.norms
        safe_norms = norms.detach().clamp(*ADAFACE_NORM_CLIP)  # detached, as the authors' safe_norms
        self._update_statistics(safe_norms, batch.labels >= 0)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        scaler = (self.config.adaface_h * (safe_norms[batch.rows] - mean) / (std + ADAFACE_EPS)).clamp(-1.0, 1.0)
        margin = self.config.adaface_margin * batch.lambdas()
        params = torch.stack([-margin * scaler, margin + margin * scaler], dim=1)
        return MarginStep(params=params)

    def target_logit(self, cos, params):
        params = params.to(cos.dtype)
        theta = torch.acos(cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        shifted = (theta + params[:, 0]).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return self.scale * (torch.cos(shifted) - params[:, 1])
