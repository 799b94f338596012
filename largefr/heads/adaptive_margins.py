"""CurricularFace, MagFace, AdaFace and ElasticFace on the sharded head: per-row margins and their state.

Each type turns this step's inputs (feature norms, target cosines, running statistics, random
draws) into per-row margin parameters (angular, additive) of the rows whose target class lives on
this rank, and a target logit s*psi_i(cos) of them. `ShardedMarginHead` applies it exactly like
the fixed margins (in place on the target entries, exact gradient), on any number of ranks, with
Partial FC, in the chunked mode and with bf16 logits. Notation: c = cos(theta) of a row with its
class, a = ||f|| the raw embedding's norm, lambda_i the cluster-guided lambda of the row's class
(1 without the cluster terms), s = head scale.

curricularface (Huang et al. 2020; the authors' head/metrics.py::CurricularFace, m = 0.5, s = 64):
    target s*cos(theta + m_i) with insightface's th/mm fallback past pi (exactly our ArcFace), and
    every negative with c_j > T_i = cos(theta_i + m_i) (the plain formula, no fallback, as the
    authors' mask) becomes s*c_j*(t + c_j). t <- 0.01 * mean_i c_i + 0.99 * t BEFORE its use in the
    step (t starts at 0), mean over the valid rows of the global batch (one all-reduce of the
    B_g target cosines, so every rank holds the same t); t is detached as in the original
    (updated under no_grad), the modulation's gradient is t + 2 c_j. m_i = lambda_i * m.
magface (Meng et al. 2021; the authors' models/magface.py::MagLinear, MagLoss and run/run.sh:
    l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35, easy_margin = True):
    a_i clamped to [l_a, u_a], m(a) = (u_m - l_m)/(u_a - l_a) * (a - l_a) + l_m, target
    s*cos(theta + m_i) (margin only where c > 0 by default, as MagLinear), loss
    CE + lambda_g * mean_i (a_i/u_a^2 + 1/a_i). The norm is NOT detached: the gradient reaches the
    embedding through the margin and through g (zero outside [l_a, u_a], the clamp's), as in the
    original. m_i = lambda_i * m(a_i). The mean of g runs over the valid rows of the global
    batch; each rank sums the rows whose class it owns, so its backward carries only those.
adaface (Kim et al. 2022; the authors' head.py::AdaFace and main.py: m = 0.4, h = 0.333,
    t_alpha = 0.01, eps = 1e-3, initial batch_mean 20, batch_std 100):
    a clipped to [0.001, 100] and DETACHED (as the original: no gradient through the norm);
    running mean/std of a (unbiased std over the valid rows of the global batch, every rank
    computes them from the same gathered batch) updated before use; z = clip(h*(a - mean)/(std +
    eps), -1, 1); g_angle = -m_i*z, g_add = m_i*(1 + z); target s*(cos(clip(acos(clip(c, -1+eps,
    1-eps)) + g_angle, eps, pi-eps)) - g_add) with the clips' zero gradients. m_i = lambda_i * m.
    Deliberate difference: the original also clamps NON-target cosines to +-(1 - eps); the head
    does not (it changes a logit only where a negative's cosine exceeds 0.999).
elasticface (Boutros et al. 2022; the authors' utils/losses.py::ElasticArcFace / ElasticCosFace
    with `plus`, config/config.py: m = 0.5 arc / 0.35 cos, sigma = 0.05, plus: 0.0175 arc / 0.02 cos):
    per valid row (batch order) a margin ~ N(m, sigma) from a seeded CPU generator identical on
    every rank (its state is checkpointed); arc: s*cos(theta + m_i) with NO fallback past pi (the
    authors' acos/cos), cos: s*(c - m_i). Sorted (plus): the drawn margins are sorted ascending
    and the row at batch position k gets sorted[order[k]], order = the valid rows sorted by target
    cosine, descending (torch.sort on the global target cosines, detached), exactly the authors'
    `margin[idicate_cosie]`. m_i = lambda_i * drawn margin.

Running state (t; AdaFace's mean and std; ElasticFace's generator) is identical on every rank,
lives in this module's state_dict, and is saved with the replicated part of a training checkpoint
(world-size independent). `undo_last_update` restores it when the trainer skips a non-finite step.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import sum_partials_across_ranks
from largefr.choices import ADAPTIVE_MARGIN_TYPES
from largefr.heads.margin import SIN_FLOOR, MarginConfig

ADAFACE_EPS = 1e-3  # the authors' self.eps: cosine clamp, angle clip and std offset
ADAFACE_NORM_CLIP = (0.001, 100.0)  # the authors' safe_norms clip


class AdaptiveStep(NamedTuple):
    """What one step of an adaptive margin hands to the head."""

    params: torch.Tensor
    """(n, 2) angular and additive margin of each local target row (may carry a gradient: MagFace)."""
    hard_threshold: torch.Tensor | None = None
    """CurricularFace: (B_g,) T_i per gathered row, +inf where the row has no target; None: no modulation."""
    curricular_t: torch.Tensor | None = None
    """CurricularFace: the 0-d t used this step."""
    extra_loss: torch.Tensor | None = None
    """MagFace: lambda_g * mean g(a), same value on every rank; added to the cross entropy."""


def arc_psi(cos: torch.Tensor, angular: torch.Tensor, fallback: str) -> torch.Tensor:
    """cos(theta + m) per element, differentiable in cos and m; fallback 'th_mm', 'easy' or 'none' past pi."""
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN_FLOOR))
    shifted = cos * torch.cos(angular) - sin * torch.sin(angular)
    if fallback == "none":
        return shifted
    if fallback == "easy":
        return torch.where(cos > 0, shifted, cos)
    return torch.where(cos > torch.cos(math.pi - angular), shifted, cos - angular * torch.sin(angular))


def modulate_hard_negatives_(logits: torch.Tensor, threshold: torch.Tensor, t: torch.Tensor,
                             target_rows: torch.Tensor, target_cols: torch.Tensor, scale: float) -> torch.Tensor:
    """CurricularFace in place: s*c -> s*c*(t + c) where c > threshold_i, off the target entries.

    logits: (rows, cols) holding s*c; threshold: (rows,) (+inf: the row has none). Returns the
    derivative of the new logits w.r.t. the old ones (t + 2c on hard negatives, 1 elsewhere), the
    exact backward multiplier.
    """
    not_hard = logits <= (threshold * scale).to(logits.dtype).unsqueeze(1)
    not_hard[target_rows, target_cols] = True
    t_value = t.to(logits.dtype)
    factor = torch.add(t_value, logits, alpha=1.0 / scale).masked_fill_(not_hard, 1.0)  # t + c
    logits.mul_(factor)
    return factor.mul_(2.0).sub_(t_value).masked_fill_(not_hard, 1.0)  # 2(t + c) - t = t + 2c


class AdaptiveMargin(nn.Module):
    """Base of the four types: state handling; subclasses define `step` and `target_logit`."""

    needs_target_facts = False
    """True when `step` needs every gathered row's target cosine and lambda (one all-reduce)."""

    def __init__(self, cfg: MarginConfig):
        super().__init__()
        self.cfg = cfg
        self._undo: dict[str, torch.Tensor] | None = None

    def step(self, *, norms: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
             target_cos: torch.Tensor | None, global_lambda: torch.Tensor | None,
             row_lambda: torch.Tensor | None, group: ProcessGroup | None) -> AdaptiveStep:
        """This step's margins. norms: (B_g,) ||f|| with grad; labels: (B_g,) (-1 ignored); rows: gathered
        rows with a local target; target_cos, global_lambda: (B_g,) of every row (when needs_target_facts);
        row_lambda: (n,) lambda of the local target rows or None."""
        raise NotImplementedError

    def target_logit(self, cos: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """s * psi_i(cos) of the local target rows, differentiable in cos and params."""
        raise NotImplementedError

    def _remember(self) -> None:
        self._undo = {name: buffer.clone() for name, buffer in self.named_buffers()}

    @torch.no_grad()
    def undo_last_update(self) -> None:
        """Put the running state back as before the last step (the trainer skipped it)."""
        if self._undo is None:
            return
        for name, buffer in self.named_buffers():
            buffer.copy_(self._undo[name])
        self._undo = None

    def stats(self) -> dict[str, float]:
        """Running state for the logs (a host sync: call on logging steps)."""
        return {f"margin_{name}": float(buffer) for name, buffer in self.named_buffers()}


def _lambda_or_one(row_lambda: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if row_lambda is None else row_lambda.detach().to(like.dtype)


class CurricularFaceMargin(AdaptiveMargin):
    needs_target_facts = True

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64, device=device))

    def step(self, *, norms, labels, rows, target_cos, global_lambda, row_lambda, group) -> AdaptiveStep:
        valid = labels >= 0
        with torch.no_grad():
            self._remember()
            count = valid.sum()
            mean = torch.where(valid, target_cos, torch.zeros_like(target_cos)).sum() / count.clamp(min=1)
            momentum = self.cfg.curricular_momentum
            updated = momentum * mean.to(self.t.dtype) + (1.0 - momentum) * self.t
            self.t.copy_(torch.where(count > 0, updated, self.t))  # no host sync on the count
            row_margin = self.cfg.margin * global_lambda.to(target_cos.dtype)
            threshold = arc_psi(target_cos, row_margin, "none")
            threshold = torch.where(valid, threshold, torch.full_like(threshold, math.inf))
        margin = self.cfg.margin * _lambda_or_one(row_lambda, norms[rows].detach())
        params = torch.stack([margin, torch.zeros_like(margin)], dim=1)
        return AdaptiveStep(params=params, hard_threshold=threshold, curricular_t=self.t.clone())

    def target_logit(self, cos, params):
        return self.cfg.scale * arc_psi(cos, params[:, 0].to(cos.dtype), "th_mm")


class MagFaceMargin(AdaptiveMargin):
    def step(self, *, norms, labels, rows, target_cos, global_lambda, row_lambda, group) -> AdaptiveStep:
        cfg = self.cfg
        magnitude = norms[rows].clamp(cfg.magface_l_a, cfg.magface_u_a)  # keeps the gradient inside the bounds
        slope = (cfg.magface_u_margin - cfg.magface_l_margin) / (cfg.magface_u_a - cfg.magface_l_a)
        margin = (slope * (magnitude - cfg.magface_l_a) + cfg.magface_l_margin) * _lambda_or_one(row_lambda,
                                                                                                magnitude)
        params = torch.stack([margin, torch.zeros_like(margin)], dim=1)
        regulariser = magnitude / cfg.magface_u_a ** 2 + 1.0 / magnitude
        count = (labels >= 0).sum().clamp(min=1).to(norms.dtype)
        mean_g = sum_partials_across_ranks(regulariser.sum() / count, group)
        return AdaptiveStep(params=params, extra_loss=cfg.magface_lambda_g * mean_g)

    def target_logit(self, cos, params):
        fallback = "easy" if self.cfg.magface_easy_margin else "th_mm"
        return self.cfg.scale * arc_psi(cos, params[:, 0].to(cos.dtype), fallback)


class AdaFaceMargin(AdaptiveMargin):
    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg)
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
        alpha = self.cfg.adaface_t_alpha
        enough = count > 1
        for buffer, value in ((self.batch_mean, mean), (self.batch_std, variance.sqrt())):
            buffer.copy_(torch.where(enough, alpha * value.to(buffer.dtype) + (1.0 - alpha) * buffer, buffer))

    def step(self, *, norms, labels, rows, target_cos, global_lambda, row_lambda, group) -> AdaptiveStep:
        safe_norms = norms.detach().clamp(*ADAFACE_NORM_CLIP)  # detached, as the authors' safe_norms
        self._update_statistics(safe_norms, labels >= 0)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        scaler = (self.cfg.adaface_h * (safe_norms[rows] - mean) / (std + ADAFACE_EPS)).clamp(-1.0, 1.0)
        margin = self.cfg.adaface_margin * _lambda_or_one(row_lambda, scaler)
        params = torch.stack([-margin * scaler, margin + margin * scaler], dim=1)
        return AdaptiveStep(params=params)

    def target_logit(self, cos, params):
        params = params.to(cos.dtype)
        theta = torch.acos(cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        shifted = (theta + params[:, 0]).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return self.cfg.scale * (torch.cos(shifted) - params[:, 1])


class ElasticFaceMargin(AdaptiveMargin):
    def __init__(self, cfg: MarginConfig, seed: int):
        super().__init__(cfg)
        self.needs_target_facts = cfg.elastic_sorted
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same state on every rank and device type

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _remember(self) -> None:
        self._undo = {"generator": self.generator.get_state()}

    @torch.no_grad()
    def undo_last_update(self) -> None:
        if self._undo is not None:
            self.generator.set_state(self._undo["generator"])
            self._undo = None

    @torch.no_grad()
    def draw(self, labels: torch.Tensor, target_cos: torch.Tensor | None) -> torch.Tensor:
        """(B_g,) margin of every gathered row (0 where ignored): one N(m, sigma) draw per valid row."""
        self._remember()
        valid_rows = torch.nonzero(labels >= 0).squeeze(1)
        mean, std = self.cfg.elastic_mean_std()
        drawn = torch.randn(valid_rows.numel(), generator=self.generator, dtype=torch.float64) * std + mean
        drawn = drawn.to(labels.device)
        if self.cfg.elastic_sorted:
            order = torch.argsort(target_cos[valid_rows], descending=True)
            drawn = torch.sort(drawn).values[order]  # the authors' margin[idicate_cosie], literally
        return torch.zeros(labels.shape, dtype=torch.float64, device=labels.device).index_put_((valid_rows,), drawn)

    def step(self, *, norms, labels, rows, target_cos, global_lambda, row_lambda, group) -> AdaptiveStep:
        margin = self.draw(labels, target_cos)[rows].to(norms.dtype) * _lambda_or_one(row_lambda, norms[rows].detach())
        zeros = torch.zeros_like(margin)
        pair = (margin, zeros) if self.cfg.elastic_form == "arc" else (zeros, margin)
        return AdaptiveStep(params=torch.stack(pair, dim=1))

    def stats(self) -> dict[str, float]:
        return {}

    def target_logit(self, cos, params):
        params = params.to(cos.dtype)
        if self.cfg.elastic_form == "arc":
            return self.cfg.scale * arc_psi(cos, params[:, 0], "none")
        return self.cfg.scale * (cos - params[:, 1])


def build_adaptive_margin(cfg: MarginConfig, *, seed: int, device: torch.device | None = None) -> AdaptiveMargin:
    """The state module of an adaptive margin type (cfg.adaptive must hold)."""
    if cfg.type == "curricularface":
        return CurricularFaceMargin(cfg, device)
    if cfg.type == "magface":
        return MagFaceMargin(cfg)
    if cfg.type == "adaface":
        return AdaFaceMargin(cfg, device)
    if cfg.type == "elasticface":
        return ElasticFaceMargin(cfg, seed)
    raise ValueError(f"margin type {cfg.type!r} is not adaptive; build_adaptive_margin takes one of "
                     f"{ADAPTIVE_MARGIN_TYPES}")
