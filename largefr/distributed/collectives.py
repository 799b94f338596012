"""Collectives as small autograd functions; every one takes its process group explicitly.

Modelled on the shape of Megatron-LM's tensor-parallel mappings: a named `autograd.Function`
behind a thin wrapper.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# torch 2.13 renamed the tensor collectives (*_single); keep the old names for torch >= 2.4.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _supports_reduce_scatter(group: ProcessGroup | None) -> bool:
    return dist.get_backend(group) != "gloo"  # gloo has no reduce_scatter


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (equal row counts), without autograd."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_tensor(out, tensor, group=group)
    return out


def reduce_scatter_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum `tensor` over ranks and return this rank's block of rows (dim 0 split evenly)."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    rows = tensor.shape[0] // world
    if _supports_reduce_scatter(group):
        out = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _reduce_scatter_tensor(out, tensor, group=group)
        return out
    summed = tensor.clone()
    dist.all_reduce(summed, group=group)
    rank = group_rank(group)
    return summed[rank * rows:(rank + 1) * rows].contiguous()


class _AllGatherRows(torch.autograd.Function):
    """Forward: all-gather rows. Backward: reduce-scatter (sum) of the gradient of the gathered rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return all_gather_rows(tensor, group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return reduce_scatter_rows(grad_output, ctx.group), None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather rows whose backward sums every rank's gradient of this rank's rows.

    Each rank's backward holds only its columns' share of dL/dF in the sharded losses, so the
    summed gradient is the exact gradient of the (replicated) loss w.r.t. the local rows.
    """
    if group_size(group) == 1:
        return tensor
    return _AllGatherRows.apply(tensor, group)


class _SumPartials(torch.autograd.Function):
    """Forward: all-reduce (sum) of every rank's partial value. Backward: identity."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        return all_reduce_sum_(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def sum_partials_across_ranks(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Total of per-rank partial sums of a loss, identical on every rank; each rank's backward keeps its part.

    For a loss whose rows are split between ranks (each rank sums the terms it owns): the gradient of
    the total w.r.t. this rank's part is the identity, and `all_gather_with_grad`'s backward then sums
    the ranks' feature gradients into the exact one.
    """
    if group_size(group) == 1:
        return tensor
    return _SumPartials.apply(tensor, group)


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_min_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return tensor


def broadcast_buffers_(module: torch.nn.Module, group: ProcessGroup | None, src: int = 0) -> None:
    """Give every rank group-rank `src`'s buffers of `module` (BatchNorm running statistics), in place."""
    if group_size(group) == 1:
        return
    source = dist.get_global_rank(group, src) if group is not None else src
    for buffer in module.buffers():
        dist.broadcast(buffer, src=source, group=group)


def all_gather_variable_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate rows from every rank when ranks hold different row counts (no autograd)."""
    world = group_size(group)
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = all_gather_rows(count, group).tolist()
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_rows(padded, group).view(world, max(counts), *tensor.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)], dim=0)
