"""The step's phase-timer contract: how the loop and the head say where a step's time goes, and the no-op default.

The step (largefr/train/step.py) wraps each of its phases in `with timer.phase(name):`. Backward
passes cannot be wrapped from the outside: a part of the forward marks its output with
`timer.mark_backward(tensor, name)`, and when autograd reaches that mark the running phase is
charged to `name` from then on (`switch`). The loop declares this contract; the profile tool's
`largefr.perf.profiling.PhaseTimer` implements it. By default the step holds `NULL_TIMER`, whose
`phase()` returns one shared `nullcontext` and whose marks return the tensor itself: no clock read,
no device synchronisation, no autograd node.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

_NULL_CONTEXT = contextlib.nullcontext()


class PhaseTiming(Protocol):
    """What the step and a head call to time their phases (forward blocks and the backward that follows)."""

    enabled: bool
    """False for the no-op timer: callers may skip work done only for timing."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A block whose time (exclusive of nested phases) is charged to `name`."""

    def switch(self, name: str) -> None:
        """From now on the innermost running phase is charged as `name` (called from backward hooks)."""

    def mark_backward(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """`tensor` unchanged; when backward reaches it, the timer switches to phase `name`."""


class NullPhaseTimer:
    """Profiling off: every call is a no-op."""

    enabled = False

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return _NULL_CONTEXT

    def switch(self, name: str) -> None:
        return None

    def mark_backward(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor


NULL_TIMER = NullPhaseTimer()
"""The step's timer when nothing profiles it."""
