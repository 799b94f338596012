"""Softmax cross entropy over columns split across ranks (rows replicated on every rank).

Same computation as Megatron-LM's vocab-parallel cross entropy, written for the three largefr
losses: each row has one positive column that lives on exactly one rank, or on none (ignored).
Forward needs two all-reduces (max, then sum of exp fused with the positive logit); backward
needs none.
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_max_, all_reduce_sum_


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, local_target: torch.Tensor, group: ProcessGroup | None,
                consume_logits: bool):
        low_precision = local_logits.dtype in (torch.float16, torch.bfloat16)
        logits = local_logits.float() if low_precision else local_logits
        rows = logits.shape[0]
        has_target = local_target >= 0

        # 1. global row max (no gradient flows through the shift)
        if logits.shape[1] > 0:
            row_max = logits.amax(dim=1)
        else:
            row_max = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
        all_reduce_max_(row_max, group)

        # 2. fused all-reduce: sum of exp, positive logit, and "row has a positive somewhere"
        safe_target = local_target.clamp(min=0)
        positive = torch.where(
            has_target,
            logits.gather(1, safe_target.unsqueeze(1)).squeeze(1) if logits.shape[1] > 0 else torch.zeros_like(row_max),
            torch.zeros_like(row_max),
        )
        # the softmax buffer: the logits themselves when they are ours to overwrite (a float32 copy, or a caller's
        # buffer nobody else reads), else one logits-sized temporary
        shifted = logits.sub_(row_max.unsqueeze(1)) if consume_logits or low_precision \
            else torch.sub(logits, row_max.unsqueeze(1))
        exp_logits = shifted.exp_()
        fused = torch.stack([exp_logits.sum(dim=1), positive, has_target.to(logits.dtype)])
        all_reduce_sum_(fused, group)
        sum_exp, positive, valid = fused[0], fused[1], fused[2] > 0.5

        num_valid = valid.sum().clamp(min=1)
        row_loss = torch.log(sum_exp) + row_max - positive
        loss = torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum() / num_valid

        softmax = exp_logits.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(softmax, local_target, valid, num_valid)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, valid, num_valid = ctx.saved_tensors
        grad = softmax  # reuse storage: this function is called once per forward
        has_target = local_target >= 0
        rows = torch.nonzero(has_target).squeeze(1)
        if rows.numel() > 0:
            grad[rows, local_target[rows]] -= 1.0
        scale = (grad_loss / num_valid) * valid.to(grad.dtype)
        grad.mul_(scale.unsqueeze(1))
        return grad.to(ctx.input_dtype), None, None, None


def sharded_cross_entropy(
    local_logits: torch.Tensor, local_target: torch.Tensor, group: ProcessGroup | None, *,
    consume_logits: bool = False,
) -> torch.Tensor:
    """Mean cross entropy of rows whose columns are split across the ranks of `group`.

    local_logits: (rows, local_columns) this rank's columns of every row.
    local_target: (rows,) int64, the local column index of the row's positive, or -1 when the
        positive lives on another rank. A row whose positive lives on no rank is ignored and the
        mean runs over the remaining rows (counted over all ranks). Returns the same scalar on
        every rank; backward needs no communication.
    consume_logits: the softmax (and then, in backward, the logits' gradient) is computed in the
        logits' own buffer instead of a new one; pass True only for logits nobody else reads (the
        margin head's, which it made for this call): their values are gone after the call.
    """
    if local_logits.dim() != 2 or local_target.shape != local_logits.shape[:1]:
        raise ValueError(
            f"sharded_cross_entropy expects logits (rows, cols) and target (rows,), got "
            f"{tuple(local_logits.shape)} and {tuple(local_target.shape)}"
        )
    return _ShardedCrossEntropy.apply(local_logits, local_target.long(), group, consume_logits)
