"""CurricularFace (Huang et al. 2020; the authors' head/metrics.py::CurricularFace, m = 0.5, s = 64).

Target s*cos(theta + m_i) with insightface's th/mm fallback past pi (exactly our ArcFace), and every
negative with c_j > T_i = cos(theta_i + m_i) (the plain formula, no fallback, as the authors' mask)
becomes s*c_j*(t + c_j). t <- momentum * mean_i c_i + (1 - momentum) * t BEFORE its use in the step
(t starts at 0, head.curricular_momentum = 0.01), mean over the valid rows of the global batch (the
head's one all-reduce of the B_g target cosines, so every rank holds the same t); t is detached as in
the original (updated under no_grad), the modulation's gradient is t + 2 c_j. m_i = lambda_i * m.

Cost. The modulation is one pass over the logits in row blocks: a block's mask, its multiplier
t + c, the multiplication and the derivative t + 2c kept for backward are computed while the block
is in cache (on a CPU blocks of MODULATION_BLOCK_CPU logits; on a GPU one block). The derivative is
the one logits-sized buffer CurricularFace adds to a step; on a CPU its blocks are kept from one
step's backward to the next step's forward (`largefr.heads.spare.SpareBuffers`), because fresh memory of that size is
new pages the kernel zeroes at every step (a third of the modulation's time), while a GPU's caching
allocator recycles it anyway. The step's peak memory does not change; between steps a CPU run holds
that buffer (B_g x sampled classes x 4 bytes), which `Margin.held_tensors` reports.
"""
from __future__ import annotations

import math

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import Margin, MarginBatch, MarginStep, arc_psi
from largefr.heads.spare import SpareBuffers

MODULATION_BLOCK_CPU = 1 << 20
"""Logits per row block of the modulation on a CPU (4 MiB of float32: cache-sized, and recycled by the allocator)."""


class RowBlockDerivative:
    """The modulation's derivative as row blocks (rows [k*rows_per_block, ...) of the logits, in order)."""

    def __init__(self, rows_per_block: int, spare: SpareBuffers | None):
        self.rows_per_block, self.spare = rows_per_block, spare
        self.blocks: list[torch.Tensor] = []

    def mul_(self, grad: torch.Tensor) -> torch.Tensor:
        """grad times the derivative, in place; the blocks then go back to the margin's spare ones (CPU) or are
        freed, as a backward frees what it saved (the head's graph takes one backward: its softmax buffer is
        reused in place, which autograd's version check enforces)."""
        for index, block in enumerate(self.blocks):
            start = index * self.rows_per_block
            grad[start:start + block.shape[0]].mul_(block)
        if self.spare is not None:
            self.spare.replace(self.blocks)
        self.blocks = []
        return grad


class HardNegatives:
    """CurricularFace's modulation of one step: s*c -> s*c*(t + c) where c > threshold_i."""

    def __init__(self, threshold: torch.Tensor, t: torch.Tensor, scale: float, spare: SpareBuffers):
        self.threshold, self.t, self.scale, self.spare = threshold, t, scale, spare

    @torch.no_grad()
    def apply_(self, logits: torch.Tensor) -> RowBlockDerivative:
        """In place on logits (rows x cols, holding s*c; threshold (rows,), +inf: the row has none); returns the
        derivative of the new logits w.r.t. the old ones (t + 2c on hard negatives, 1 elsewhere)."""
        rows, cols = logits.shape
        on_cpu = logits.device.type == "cpu"
        block = MODULATION_BLOCK_CPU if on_cpu else rows * cols
        derivative = RowBlockDerivative(max(1, block // max(cols, 1)), self.spare if on_cpu else None)
        bound = (self.threshold * self.scale).to(logits.dtype).unsqueeze(1)
        t_value = self.t.to(logits.dtype)
        one = torch.ones((), dtype=logits.dtype, device=logits.device)
        step = derivative.rows_per_block
        for start in range(0, rows, step):
            part = slice(start, start + step)
            out = self.spare.take_like(logits[part]) if on_cpu else torch.empty_like(logits[part])
            derivative.blocks.append(_modulate_block_(logits[part], bound[part], t_value, one, self.scale, out))
        return derivative


def _modulate_block_(logits: torch.Tensor, bound: torch.Tensor, t: torch.Tensor, one: torch.Tensor,
                     scale: float, out: torch.Tensor) -> torch.Tensor:
    """One row block: logits *= t + c where logits > bound (per row); returns `out` = t + 2c there, 1 elsewhere."""
    easy = logits <= bound
    factor = torch.add(t, logits, alpha=1.0 / scale, out=out)  # t + c
    torch.where(easy, one, factor, out=factor)
    logits.mul_(factor)
    derivative = torch.add(-t, factor, alpha=2.0, out=factor)  # 2(t + c) - t = t + 2c
    return torch.where(easy, one, derivative, out=derivative)


class CurricularFace(Margin, name="curricularface"):
    """The target as ArcFace's; hard negatives modulated by the running t (a buffer, in `margin_state`)."""

    needs_target_facts = True

    def __init__(self, config: HeadConfig, *, seed: int = 0, device: torch.device | None = None):
        super().__init__(config, seed=seed, device=device)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64, device=device))
        self.spare = SpareBuffers()

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
        return MarginStep(params=params, negatives=HardNegatives(threshold, self.t.clone(), self.scale, self.spare))

    def target_logit(self, cos, params):
        return self.scale * arc_psi(cos, params[:, 0].to(cos.dtype), "th_mm")

    def held_tensors(self) -> list[torch.Tensor]:
        return self.spare.held_tensors()
