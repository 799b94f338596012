"""Gradient handling of the head that lives outside the DeepSpeed engine (docs/DESIGN.md sections 4 and 6).

Three factors meet at the boundary between the engine's backbone and the external head:

* Backbone compensation (section 4). Each rank's sharded losses hold only that rank's columns'
  share of dL/dF; the all-gather's backward sums the shares, which is the exact gradient of the
  local rows. DeepSpeed then AVERAGES backbone gradients over the data-parallel ranks, leaving
  them 1/world too small. `scale_feature_gradient` multiplies the gradient flowing from the head
  into the backbone's embeddings by `world`, once, at the one place every backbone gradient
  passes; head gradients are untouched by it. (Scaling the loss instead would scale the head's
  gradients too, which would then need undoing.)
* Gradient accumulation. The trainer calls `engine.backward(loss, scale_wrt_gas=False)`, so
  neither the engine (0.19.8 divides the loss when scale_wrt_gas is True) nor its output hooks
  apply 1/gas; largefr applies it itself, exactly once: to the backbone through the same
  feature-gradient factor (`world / gas`) and to the head in `head_gradient_multiplier`.
  Being explicit keeps the result independent of how a DeepSpeed release places that factor.
* fp16 loss scaling. `engine.backward` multiplies the loss by the engine's current scale, so the
  head's gradients carry it; they are divided by the scale read BEFORE `engine.step()` (the step
  may change it), and the head step is skipped when the engine skipped an overflowed step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_max_, all_reduce_sum_
from largefr.heads.optim import RowSparseOptimizer
from largefr.heads.row_gradient import GatheredRows, coalesce_row_gradient_, row_gradient_values


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * ctx.factor, None


def scale_feature_gradient(local_embeddings: torch.Tensor, factor: float) -> torch.Tensor:
    """Return `local_embeddings` unchanged; their gradient is multiplied by `factor` in backward."""
    if factor == 1.0:
        return local_embeddings
    return _ScaleGradient.apply(local_embeddings, factor)


def backbone_gradient_factor(*, world_size: int, gradient_accumulation_steps: int) -> float:
    """Factor on dL/d(local embeddings): undo DeepSpeed's 1/world average, apply 1/gas once."""
    return world_size / gradient_accumulation_steps


@dataclass(kw_only=True, frozen=True)
class HeadStepDecision:
    """What to do with the head's accumulated gradients at an accumulation boundary."""

    apply: bool
    """Take the head optimizer step (False: zero the gradients, leave weights and state alone)."""
    grad_multiplier: float
    """Multiply every head gradient by this before clipping and stepping."""
    reason: str
    """'applied', 'engine skipped the step (fp16 overflow)', 'non-finite head gradient' or NO_HEAD_GRADIENT."""


NO_HEAD_GRADIENT = "no head gradient (every micro-batch non-finite)"


def head_gradient_multiplier(*, loss_scale: float, gradient_accumulation_steps: int) -> float:
    """1 / (loss scale x accumulation steps): turns summed, scaled micro-batch gradients into the mean."""
    if not loss_scale > 0 or not math.isfinite(loss_scale):
        raise ValueError(f"loss scale must be a positive finite number, got {loss_scale}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    return 1.0 / (loss_scale * gradient_accumulation_steps)


def decide_head_step(*, loss_scale: float, engine_step_applied: bool, head_grads_finite: bool,
                     gradient_accumulation_steps: int, head_has_gradients: bool = True) -> HeadStepDecision:
    """Pure decision for the head step, fed by the engine's scale and overflow flag.

    loss_scale: the factor `engine.backward` multiplied the loss by (read before `engine.step()`).
    engine_step_applied: `engine.was_step_applied()` after the boundary `engine.step()`.
    head_grads_finite: whether every head gradient is finite on every rank (all-reduced).
    head_has_gradients: whether any head parameter received a gradient (False when every
        micro-batch of the step was non-finite; the same on every rank, which agree on finiteness).
    """
    multiplier = head_gradient_multiplier(loss_scale=loss_scale,
                                          gradient_accumulation_steps=gradient_accumulation_steps)
    if not head_has_gradients:
        return HeadStepDecision(apply=False, grad_multiplier=multiplier, reason=NO_HEAD_GRADIENT)
    if not engine_step_applied:
        return HeadStepDecision(apply=False, grad_multiplier=multiplier,
                                reason="engine skipped the step (fp16 overflow)")
    if not head_grads_finite:
        return HeadStepDecision(apply=False, grad_multiplier=multiplier, reason="non-finite head gradient")
    return HeadStepDecision(apply=True, grad_multiplier=multiplier, reason="applied")


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The stored gradient values of `params`: dense gradients, and the (rows, d) blocks of sparse row gradients
    (coalesced first), so every pass below costs the rows a step used, not the whole shard."""
    grads = []
    for param in params:
        coalesce_row_gradient_(param)
        if param.grad is not None:
            grads.append(row_gradient_values(param.grad))
    return grads


def is_all_finite(tensor: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN or infinity in `tensor`, in one reading pass without temporaries.

    Its smallest and largest values are finite exactly when every value is (`aminmax` propagates NaN, and an
    infinity is an extreme). `torch.isfinite(tensor).all()` gives the same answer but makes a copy of the
    absolute values and three bool tensors of the tensor's size first: about 0.3 s per step on one rank's
    500,000 x 128 gradient on the 2-core CPU dev machine, against 0.01 s here.
    """
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def grads_finite_everywhere(params: list[torch.nn.Parameter], group: ProcessGroup | None) -> bool:
    """True when every gradient of `params` is finite on every rank of `group` (one all-reduce)."""
    grads = _grads(params)
    bad = torch.zeros(1, dtype=torch.float32, device=params[0].device)  # the group's device, grads or not
    for grad in grads:
        bad += ~is_all_finite(grad)
    all_reduce_max_(bad, group)
    return bool(bad.item() == 0)


def global_grad_norm(*, sharded: list[torch.nn.Parameter], replicated: list[torch.nn.Parameter],
                     group: ProcessGroup | None) -> torch.Tensor:
    """L2 norm of the whole head's gradient: sharded rows summed over ranks, replicated ones once."""
    grads = _grads(sharded)
    device = (sharded + replicated)[0].device  # the group's device, grads or not
    sharded_sq = torch.zeros(1, dtype=torch.float32, device=device)
    for grad in grads:
        sharded_sq += grad.float().pow(2).sum()
    all_reduce_sum_(sharded_sq, group)
    replicated_sq = sum((g.float().pow(2).sum() for g in _grads(replicated)), torch.zeros(1, device=device))
    return (sharded_sq + replicated_sq).sqrt().squeeze(0)


@dataclass(kw_only=True, frozen=True)
class AgreedFlags:
    """What the head step's one all-reduce makes the ranks agree on."""

    grads_finite: bool
    """Every head gradient is finite on every rank (True when not checked)."""
    sharded_norm_sq: float
    """Squared L2 norm of the sharded gradients summed over ranks (0.0 when not asked for)."""
    stop_requested: bool
    """Some rank asked to stop (SIGTERM/SIGINT)."""


def agree_head_flags(*, sharded: list[torch.nn.Parameter], replicated: list[torch.nn.Parameter],
                     check_finite: bool, norm: bool, stop_requested: bool, group: ProcessGroup | None,
                     device: torch.device) -> AgreedFlags:
    """One all-reduce (sum) of [non-finite count, sharded squared norm, stop] and one read of it on the host.

    Replaces one collective per question (finiteness, clipping norm, stop) with one per step; what each
    part computes is what `grads_finite_everywhere` and `global_grad_norm` compute.
    """
    flags = torch.zeros(3, dtype=torch.float32, device=device)
    grads = _grads(sharded + replicated) if check_finite or norm else []
    if check_finite and grads:
        flags[0] = torch.stack([~is_all_finite(grad) for grad in grads]).sum()
    if norm:
        for grad in _grads(sharded):
            flags[1] += grad.float().pow(2).sum()
    flags[2] = float(stop_requested)
    all_reduce_sum_(flags, group)
    bad, norm_sq, stop = flags.tolist()
    return AgreedFlags(grads_finite=bad == 0, sharded_norm_sq=norm_sq, stop_requested=stop > 0)


@dataclass(kw_only=True)
class HeadStepResult:
    applied: bool
    reason: str
    grad_norm: float | None
    """Head gradient norm before clipping (None when no clipping was configured or the step was skipped)."""
    stop_requested: bool = False
    """Some rank asked to stop (agreed by the step's all-reduce; identical on every rank)."""


class ExternalHeadStep:
    """Applies `decide_head_step` to the head's optimizers: unscale, 1/gas, optional clip, step or skip.

    sharded: parameters holding this rank's class rows (their gradient is this rank's alone).
    replicated: parameters identical on every rank (e.g. the temperature), whose gradient the head
    has already made identical on every rank.
    A row-sparse optimizer (`RowSparseOptimizer`, Partial FC) steps the rows given to `step(rows=...)`:
    the union of the step's micro-batches' `HeadLoss.rows`.
    Each step makes one all-reduce (`agree_head_flags`): finiteness, the clipping norm and the stop flag.
    """

    def __init__(self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *,
                 sharded: list[torch.nn.Parameter], replicated: list[torch.nn.Parameter],
                 gradient_accumulation_steps: int, clip_norm: float = 0.0, group: ProcessGroup | None = None):
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.sharded = list(sharded)
        self.replicated = list(replicated)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.clip_norm = clip_norm
        self.group = group

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return self.sharded + self.replicated

    def set_learning_rate(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self, *, loss_scale: float, engine_step_applied: bool, rows: torch.Tensor | None = None,
             gathered: GatheredRows | None = None, stop_requested: bool = False) -> HeadStepResult:
        """Call once per optimizer step, after the boundary `engine.step()`; `rows` (and the forward's copy of W's
        rows, `gathered`: `HeadLoss.gathered`) go to row-sparse optimizers.

        `stop_requested`: this rank's stop flag; the result says whether any rank's was set.
        """
        has_gradients = bool(_grads(self.parameters))
        check = engine_step_applied and has_gradients
        flags = agree_head_flags(sharded=self.sharded, replicated=self.replicated, check_finite=check,
                                 norm=check and self.clip_norm > 0, stop_requested=stop_requested,
                                 group=self.group, device=self.parameters[0].device)
        decision = decide_head_step(loss_scale=loss_scale, engine_step_applied=engine_step_applied,
                                    head_grads_finite=flags.grads_finite, head_has_gradients=has_gradients,
                                    gradient_accumulation_steps=self.gradient_accumulation_steps)
        grad_norm = None
        if decision.apply:
            grads = _grads(self.parameters)
            if decision.grad_multiplier != 1.0 and grads:
                torch._foreach_mul_(grads, decision.grad_multiplier)
            if self.clip_norm > 0:
                grad_norm = self._clip(flags.sharded_norm_sq * decision.grad_multiplier ** 2)
            for optimizer in self.optimizers:
                if isinstance(optimizer, RowSparseOptimizer):
                    optimizer.step(rows=rows, gathered=gathered)
                else:
                    optimizer.step()
        self.zero_grad()
        return HeadStepResult(applied=decision.apply, reason=decision.reason, grad_norm=grad_norm,
                              stop_requested=flags.stop_requested)

    def _clip(self, sharded_norm_sq: float) -> float:
        """Scale every head gradient by min(1, clip / norm); the sharded part of the norm came with the flags."""
        device = self.parameters[0].device
        replicated_sq = sum((g.float().pow(2).sum() for g in _grads(self.replicated)), torch.zeros((), device=device))
        norm = (replicated_sq + sharded_norm_sq).sqrt()
        coefficient = torch.clamp(self.clip_norm / (norm + 1e-6), max=1.0)
        grads = _grads(self.parameters)
        if grads:
            torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
        return float(norm)
