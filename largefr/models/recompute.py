"""Activation checkpointing shared by every backbone family: recompute a block in backward instead of
storing its activations, with BatchNorm running statistics updated once per forward.

torch.utils.checkpoint runs the block's forward a second time during backward. A training-mode
BatchNorm inside it would then move its running mean/variance (and count) twice per step, so a
checkpointed model would drift from the plain one in eval mode. The recomputation here runs inside
`running_stats_frozen()`, in which largefr's BatchNorm layers (largefr/models/norm.py) normalize with
the batch's statistics (the same output and gradient) without updating them. Under torch.compile the
plain checkpoint is traced: AOTAutograd's recomputation replays no buffer update, so nothing is needed.
The random state is restored for the recomputation (torch's default), so drop path draws the same mask.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_state = threading.local()  # backward may run on an autograd worker thread: the flag is per thread


def recomputing() -> bool:
    """True while a checkpointed block's forward is being recomputed for backward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def running_stats_frozen() -> Iterator[None]:
    previous = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), running_stats_frozen()


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)`, its activations recomputed in backward rather than kept."""
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, context_fn=_contexts)
