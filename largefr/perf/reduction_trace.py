"""When the backbone's gradient reduction runs relative to backward: a torch.profiler trace of one engine backward.

`trace_reduction(engine, forward, images)` runs forward and `engine.backward` of a loss that needs no collective
of its own (the squared embeddings), under torch.profiler, and reads two things from the trace: the start of
every collective (c10d / gloo / nccl events: the data-parallel gradient reduction, here the only collectives)
and the end of the last gradient computation of the backbone's backward (AccumulateGrad, where the reducers'
hooks run, left out). Reduction overlaps backward when
collectives start before that end. Used by tests/test_reduction_overlap.py at ZeRO 0, 1 and 2 with the
trainer's settings (`largefr.train.engine.overlapped_backbone`, OVERLAP_DEFAULTS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COLLECTIVE_MARKERS = ("c10d::", "gloo:", "nccl:", "allreduce", "all_reduce", "reduce_scatter")
"""Substrings of profiler event names that mark a collective (torch 2.x names them c10d::allreduce_ and so on)."""

BACKWARD_MARKER = "autograd::engine::evaluate_function"
"""Prefix of the profiler event of every autograd function run by backward."""

ACCUMULATE_MARKER = "AccumulateGrad"
"""The autograd function that stores a parameter's gradient (reducers' hooks run inside it): not computation."""


@dataclass(kw_only=True, frozen=True)
class ReductionTrace:
    collective_starts_ms: list[float]
    """Start of every collective event, ms after the backward call began."""
    backward_compute_end_ms: float
    """End of the last autograd function other than AccumulateGrad (the backbone's first layer's gradient), ms
    after backward began: a collective launched from the last gradient's hook starts after it."""
    backward_return_ms: float
    """When `engine.backward` returned (reductions finished), ms after it began."""

    @property
    def launched_during_backward(self) -> int:
        """Collectives that started before backward's computation ended."""
        return sum(start < self.backward_compute_end_ms for start in self.collective_starts_ms)

    def as_dict(self) -> dict:
        return {"collective_starts_ms": self.collective_starts_ms,
                "backward_compute_end_ms": self.backward_compute_end_ms,
                "backward_return_ms": self.backward_return_ms,
                "launched_during_backward": self.launched_during_backward}


def _is_collective(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in COLLECTIVE_MARKERS)


def trace_reduction(engine, forward: torch.nn.Module, images: torch.Tensor) -> ReductionTrace:
    """Profile one forward + `engine.backward` (no optimizer step); where the collectives fall in backward."""
    embeddings = forward(images)
    loss = embeddings.float().pow(2).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with torch.profiler.record_function("largefr_backward"):
            engine.backward(loss, scale_wrt_gas=False)
    events = profiler.events()
    outer = next(e for e in events if e.name == "largefr_backward")
    begin = outer.time_range.start
    starts = sorted((e.time_range.start - begin) / 1e3 for e in events if _is_collective(e.name))
    compute_end = max(e.time_range.end for e in events
                      if e.name.startswith(BACKWARD_MARKER) and ACCUMULATE_MARKER not in e.name)
    return ReductionTrace(collective_starts_ms=starts, backward_compute_end_ms=(compute_end - begin) / 1e3,
                         backward_return_ms=(outer.time_range.end - begin) / 1e3)
