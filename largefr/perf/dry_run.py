"""Dry-run helpers: play one rank of a large job in this process, with tensors that hold no memory.

`fake_process_group(world_size, rank)` initialises torch.distributed's "fake" backend (as
torchtitan's init_fake_mode does): every group query (size, rank) answers as rank `rank` of
`world_size` would, and collectives return without communicating. Modules built inside it on the
meta device get the shapes rank `rank` would allocate, so a 64-rank, 100M-class job can be laid
out and counted on one CPU in seconds. `tensor_bytes` counts them (meta tensors have sizes, no data).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


@contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """The default process group is rank `rank` of `world_size` fake ranks until the block exits."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # test utility: imported only when used

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; run the dry run in a "
                           "process of its own (e.g. tools/dry_run.py)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the given (distinct) tensors would occupy, meta or real: numel x element size (a sparse tensor:
    its indices and values)."""
    return sum(tensor_bytes([tensor._indices(), tensor._values()]) if tensor.is_sparse
               else tensor.numel() * tensor.element_size() for tensor in tensors)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state."""
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
