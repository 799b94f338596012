"""The head's row-sparse optimizer step against torch's own optimizer on the same shard, alternating in one run.

Both optimizers own a copy of the same (rows x d) float32 shard and get the same gradient every repeat:
the row-sparse one as the head gives it (a sparse row gradient over the sampled rows, or the dense
gradient at sample rate 1.0), torch's as a dense gradient (its default multi-tensor `foreach` step).
Timed one after the other in every repeat, so the ratio of medians holds on a loaded machine.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from largefr.heads.optim import RowSparseAdamW, RowSparseSGD
from largefr.heads.row_gradient import sparse_row_gradient


@dataclass(kw_only=True)
class OptimizerBenchResult:
    rows: int
    dim: int
    sample_rate: float
    optimizer: str
    row_sparse_ms: float
    torch_ms: float

    @property
    def ratio(self) -> float:
        return self.row_sparse_ms / self.torch_ms

    def as_dict(self) -> dict:
        return {**self.__dict__, "ratio": round(self.ratio, 3)}


def _pair(name: str, shard: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.Optimizer,
                                                    torch.nn.Parameter, torch.optim.Optimizer]:
    ours, theirs = torch.nn.Parameter(shard.clone()), torch.nn.Parameter(shard.clone())
    if name == "sgd":
        return (ours, RowSparseSGD([ours], lr=0.1, momentum=0.9, weight_decay=5e-4),
                theirs, torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4))
    return (ours, RowSparseAdamW([ours], lr=1e-3, weight_decay=5e-4),
            theirs, torch.optim.AdamW([theirs], lr=1e-3, weight_decay=5e-4))


def bench_head_optimizer(*, rows: int, dim: int, sample_rate: float, optimizer: str, repeats: int = 20,
                         warmup: int = 3, seed: int = 0) -> OptimizerBenchResult:
    """Median milliseconds of one step of each optimizer on a (rows x d) shard with `sample_rate` of it sampled."""
    generator = torch.Generator().manual_seed(seed)
    shard = torch.randn(rows, dim, generator=generator)
    ours, our_optimizer, theirs, their_optimizer = _pair(optimizer, shard)
    sampled = max(1, min(rows, round(sample_rate * rows)))
    ours_ms, theirs_ms = [], []
    for repeat in range(warmup + repeats):
        chosen = torch.randperm(rows, generator=generator)[:sampled].sort().values
        values = torch.randn(sampled, dim, generator=generator)
        dense = torch.zeros(rows, dim).index_copy_(0, chosen, values)
        ours.grad = dense.clone() if sampled == rows else sparse_row_gradient(chosen, values, ours.shape)
        theirs.grad = dense
        started = time.perf_counter()
        our_optimizer.step(None if ours.grad.is_sparse else chosen)
        middle = time.perf_counter()
        their_optimizer.step()
        ended = time.perf_counter()
        if repeat >= warmup:
            ours_ms.append((middle - started) * 1e3)
            theirs_ms.append((ended - middle) * 1e3)
    return OptimizerBenchResult(rows=rows, dim=dim, sample_rate=sample_rate, optimizer=optimizer,
                                row_sparse_ms=statistics.median(ours_ms), torch_ms=statistics.median(theirs_ms))
