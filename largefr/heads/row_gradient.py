"""Gradients of a class-sharded weight that hold the rows a step used, not the whole shard (Partial FC).

With sampling at rate r a step touches r x num_local rows of W. A dense `index_select` would give W a
gradient of W's full size (zeros outside the sample), and everything after it (finiteness check,
loss-scale multiply, clipping, the optimizer's row gather) would pass over all of it. Here the rows
are gathered by `gather_rows`, whose backward returns a sparse COO gradient (`sparse_dim` 1: row
indices plus a (rows, d) block of values), the layout `nn.Embedding(sparse=True)` gives its weight.
A second term reading rows of the same weight in the same step (L_ali's classes) takes them from the
gathered block (`with_rows_of_block`), so one step's forward gives the weight one gradient: sorted, unique, no
copy. Autograd sums the gradients of several gathers (the micro-batches of one step) by concatenation;
`coalesce_row_gradient_` sums duplicate rows once per step and the head step, the clip and the row-sparse
optimizer then read `row_gradient_values`.

A dense gradient (sample rate 1.0: the whole shard is used) passes through these helpers unchanged.
"""
from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    """weight.index_select(0, rows); backward: a sparse row gradient of the weight's shape."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sorted_rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(sorted_rows)
        ctx.weight_shape = weight.shape
        return torch.index_select(weight, 0, sorted_rows, out=out) if out is not None \
            else weight.index_select(0, sorted_rows)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (sorted_rows,) = ctx.saved_tensors
        return sparse_row_gradient(sorted_rows, grad_rows, ctx.weight_shape), None, None


def gather_rows(weight: torch.Tensor, sorted_rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows `sorted_rows` (sorted, unique) of `weight`, a copy (into `out` when given: a spare buffer of that
    shape); the weight's gradient is a sparse tensor over those rows only."""
    return _GatherRows.apply(weight, sorted_rows, out)


class _WithRowsOfBlock(torch.autograd.Function):
    """(block, block.index_select(0, positions)); backward: the rows' gradient added into the block's, in place."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, positions: torch.Tensor):
        ctx.save_for_backward(positions)
        ctx.block_shape = block.shape
        ctx.set_materialize_grads(False)
        return block.view_as(block), block.index_select(0, positions)

    @staticmethod
    def backward(ctx, grad_block: torch.Tensor | None, grad_rows: torch.Tensor | None):
        (positions,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_block, None
        if grad_block is None:
            grad_block = grad_rows.new_zeros(ctx.block_shape)
        return grad_block.index_add_(0, positions, grad_rows), None


class GatheredRows:
    """Rows of a weight as a forward gathered them, `values` = weight[rows], for the head optimizer to read instead of
    gathering the same scattered rows from the weight again (at ten million classes, one of the four scattered passes
    over W and its state that a step's update makes).

    `of(weight, rows)` gives them while they are still those rows: the weight and the copy unwritten since the gather
    (their version counters), and the head not yet at its next forward, which may write the copy's memory (a spare
    buffer: `expire`). An optimizer that takes them updates them in place, which moves the copy's counter: they are
    taken once.
    """

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor):
        self.weight, self.rows, self.values = weight, rows, values
        self._versions = (weight._version, values._version)

    def of(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """weight[rows] when this copy still holds them, else None."""
        if self.values is None or weight is not self.weight \
                or (weight._version, self.values._version) != self._versions:
            return None
        return self.values if rows is self.rows or torch.equal(rows, self.rows) else None

    def expire(self) -> None:
        """The copy's memory may be written from now on (the head's next forward): it is given out no more."""
        self.values = None


def with_rows_of_block(block: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered block (`gather_rows`) for the step's main term, and its rows `positions` for a second term that
    reads some of the same weight's rows (L_ali's classes). Both gradients meet in one function: the rows' is added
    into the block's in place, so the weight gets one sparse gradient a step and no tensor of the block's size is
    made to sum them. The block's gradient must be a tensor nobody else holds (the cosine logits' backward makes it).
    """
    return _WithRowsOfBlock.apply(block, positions)


def sparse_row_gradient(sorted_rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A gradient of `shape` that is `values` on `sorted_rows` (sorted, unique) and zero elsewhere, without the
    zeros. Declared coalesced, so a step with one gather needs no coalescing copy."""
    return torch.sparse_coo_tensor(sorted_rows.unsqueeze(0), values, shape, is_coalesced=True,
                                   check_invariants=False)


def coalesce_row_gradient_(param: torch.Tensor) -> None:
    """Sum the duplicate rows of a sparse gradient in place of the gradient (sorted unique rows after).

    Autograd's accumulation drops the "coalesced" mark of a single gather's gradient; rows still sorted
    and unique are marked again instead of copied (`coalesce` would sort and copy every value).
    """
    grad = param.grad
    if grad is None or not grad.is_sparse or grad.is_coalesced():
        return
    rows = grad._indices()[0]
    if bool((rows[1:] > rows[:-1]).all()):
        param.grad = sparse_row_gradient(rows, grad._values(), grad.shape)
    else:
        param.grad = grad.coalesce()


def row_gradient_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored gradient values: the dense gradient itself, or a coalesced sparse gradient's (rows, d) block.

    In-place changes of the returned tensor change the gradient.
    """
    if not grad.is_sparse:
        return grad
    if not grad.is_coalesced():
        raise ValueError("a sparse row gradient must be coalesced first (coalesce_row_gradient_)")
    return grad._values()


def row_gradient_rows(grad: torch.Tensor) -> torch.Tensor:
    """Sorted unique rows of a coalesced sparse gradient."""
    if not (grad.is_sparse and grad.is_coalesced()):
        raise ValueError("row_gradient_rows needs a coalesced sparse gradient (coalesce_row_gradient_)")
    return grad._indices()[0]
