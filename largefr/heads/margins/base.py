"""The protocol every margin of the sharded head implements, and the angular arithmetic they share.

A margin (one `head.type`) is one `Margin` subclass. Each step the head hands it a `MarginBatch`
(the gathered rows, which of them have their class on this rank, their cluster-guided lambda) and
gets back a `MarginStep`:

* `params`: whatever the margin needs per local target row (a fixed margin: the row lambdas; an
  adaptive one: its per-row angular and additive margins, which may carry a gradient, e.g. MagFace's);
* `negatives`: an optional in-place modulation of the non-target logits (CurricularFace's hard
  negatives), a `NegativeModulation`, whose derivative the backward multiplies in;
* `extra_loss`: an optional term added to the cross entropy (MagFace's regulariser).

Then `target_logit(cos, params)` gives s*psi_i(cos) of the local target rows, differentiable in
both. Both heads (the default one, `largefr/heads/sharded_head.py`, and the low-memory one,
`largefr/heads/chunked.py`) call exactly these three things, in this order: `step`, then
`negatives.apply_` on a block of s*cos logits (its target cosines read before), then `target_logit`
on its target entries; backward: the block's gradient times the modulation's derivative, then the
target entries' gradient through `target_logit`.

Running state (CurricularFace's t, AdaFace's norm statistics, ElasticFace's generator) lives in the
margin's buffers or extra state, so `state_dict()` is the margin's checkpoint (`margin_state`),
identical on every rank; `undo_last_update` puts it back when the trainer skips a step. A fixed
margin has none. A subclass that names itself (`class MyFace(Margin, name="myface")`) is
registered under that head.type (`largefr.heads.margins.MARGINS`).

Notation: c = cos(theta) of a row with its class, s = head scale, lambda_i the cluster-guided
lambda of the row's class (1 without the cluster terms).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largefr.config import HeadConfig

SIN_FLOOR = 1e-12
"""Floor of 1 - c^2, so d sqrt / dc stays finite at |c| = 1 (every margin that takes sin(theta))."""
NORM_EPS = 1e-12
"""Clamp of a norm before dividing by it (F.normalize's default): the same in every head and in the warm start."""
_ACOS_CLAMP = 1e-7  # keep acos away from +-1 where its derivative is infinite

REGISTRY: dict[str, type[Margin]] = {}
"""head.type -> its Margin class, filled as each class is defined (see `Margin.__init_subclass__`)."""


@dataclass(kw_only=True)
class MarginBatch:
    """What the head knows of one step when it asks its margin for the step's margins."""

    features: torch.Tensor
    """(B_g, d) gathered embeddings, not normalised, with grad (in the head's dtype)."""
    labels: torch.Tensor
    """(B_g,) class of every gathered row, -1 for an ignored row."""
    rows: torch.Tensor
    """The gathered rows whose class lives on this rank (the local target rows), ascending."""
    row_lambda: torch.Tensor | None
    """(n,) cluster-guided lambda of the local target rows (detached), or None (= 1)."""
    target_cos: torch.Tensor | None = None
    """(B_g,) target cosine of every gathered row (0 where ignored), when the margin `needs_target_facts`."""
    global_lambda: torch.Tensor | None = None
    """(B_g,) lambda of every gathered row's class (1 where ignored), when the margin `needs_target_facts`."""
    group: ProcessGroup | None = None
    """The head's process group (for a margin whose term sums over ranks)."""

    @functools.cached_property
    def norms(self) -> torch.Tensor:
        """(B_g,) ||f|| of every gathered row, with grad."""
        return torch.linalg.vector_norm(self.features, dim=1)

    def lambdas(self) -> torch.Tensor:
        """(n,) the local target rows' lambdas as constants in the features' dtype (ones without the cluster terms)."""
        if self.row_lambda is None:
            return torch.ones(self.rows.shape, dtype=self.features.dtype, device=self.features.device)
        return self.row_lambda.detach().to(self.features.dtype)


class LogitsDerivative(Protocol):
    """d new / d old of the logits a `NegativeModulation` changed, kept for the backward."""

    def mul_(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (the same shape as the modulated logits) times the derivative, in place; returns grad."""
        ...


class NegativeModulation(Protocol):
    """An in-place change of the non-target logits of one step (CurricularFace's hard negatives)."""

    def apply_(self, logits: torch.Tensor) -> LogitsDerivative:
        """Modulate `logits` (gathered rows x a block of columns, holding s*c) in place and return its derivative.

        The target entries are the caller's: it reads their cosines before, overwrites them with the target
        logit after, and sets their gradient after multiplying by the derivative, so whatever the modulation
        does there is never seen."""
        ...


class MarginStep(NamedTuple):
    """What a margin hands the head for one step."""

    params: torch.Tensor | None
    """Per local target row, passed back to `Margin.target_logit` (may carry a gradient)."""
    negatives: NegativeModulation | None = None
    """Modulation of the non-target logits, or None."""
    extra_loss: torch.Tensor | None = None
    """A term added to the cross entropy (same value on every rank), or None."""


class Margin(nn.Module):
    """One head.type: the target logit of a cosine, its running state, optionally the negatives' modulation."""

    name: ClassVar[str]
    """The head.type this class implements."""
    needs_target_facts: bool = False
    """True when `step` reads every gathered row's target cosine and lambda (the head adds one all-reduce)."""

    def __init_subclass__(cls, *, name: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in REGISTRY:
                raise ValueError(f"margin {name!r} is defined twice: {REGISTRY[name].__qualname__} and "
                                 f"{cls.__qualname__}; give the new class another head.type")
            cls.name = name
            REGISTRY[name] = cls

    def __init__(self, config: HeadConfig, *, seed: int = 0, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self._undo: dict[str, torch.Tensor] | None = None

    @property
    def scale(self) -> float:
        """The logit scale s."""
        return float(self.config.scale)

    def step(self, batch: MarginBatch) -> MarginStep:
        """This step's margins (and the update of the running state, before its use)."""
        raise NotImplementedError

    def target_logit(self, cos: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
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

    def held_tensors(self) -> list[torch.Tensor]:
        """Workspace the margin keeps from one step to the next besides its state (memory accounting)."""
        return []

    def stats(self) -> dict[str, float]:
        """Running state for the logs (a host sync: call on logging steps)."""
        return {f"margin_{name}": float(buffer) for name, buffer in self.named_buffers()}

    def extra_repr(self) -> str:
        return f"type={self.name}, scale={self.scale}"


def shifted_cosine(cos: torch.Tensor, m1: float, m2: torch.Tensor) -> torch.Tensor:
    """cos(m1*theta + m2), differentiable in cos and m2 (m1 == 1: through sin(theta) = sqrt(1 - c^2), no acos)."""
    if m1 == 1.0:
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=SIN_FLOOR))
        return cos * torch.cos(m2) - sin * torch.sin(m2)
    theta = torch.acos(cos.clamp(-1.0 + _ACOS_CLAMP, 1.0 - _ACOS_CLAMP))
    return torch.cos(m1 * theta + m2)


def angular_psi(cos: torch.Tensor, m1: float, m2: torch.Tensor, m3: torch.Tensor | float, fallback: str) -> torch.Tensor:
    """psi(c) = cos(m1*theta + m2) - m3, with what happens past m1*theta + m2 = pi.

    fallback 'th_mm' (insightface's): past theta* = (pi - m2)/m1, the tangent continuation
    c - (pi - theta*)*sin(theta*) - m3 (for ArcFace c - m*sin(m), switching at c = cos(pi - m)); 'easy': the
    margin only where c > 0, psi = c elsewhere; 'none': the formula everywhere (ElasticFace-Arc, as its authors').
    """
    shifted = shifted_cosine(cos, m1, m2) - m3
    if fallback == "none":
        return shifted
    if fallback == "easy":
        return torch.where(cos > 0, shifted, cos)
    # switch angle theta* where m1*theta + m2 reaches pi; never past pi itself
    switch_angle = ((math.pi - m2) / m1).clamp(max=math.pi)
    # the angle added at the switch point, (m1 - 1)*theta* + m2 = pi - theta*
    tangent_drop = math.pi - switch_angle
    return torch.where(cos > torch.cos(switch_angle), shifted, cos - tangent_drop * torch.sin(switch_angle) - m3)


def arc_psi(cos: torch.Tensor, angular: torch.Tensor, fallback: str) -> torch.Tensor:
    """cos(theta + m) per element (ArcFace's form, m per row), with `angular_psi`'s fallbacks."""
    return angular_psi(cos, 1.0, angular, 0.0, fallback)
