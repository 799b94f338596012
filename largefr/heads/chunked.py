"""Low-memory sharded margin softmax: logits over column blocks, online log-sum-exp, recomputed backward.

The default head materialises the (B_g x S) logits of this rank's S sampled classes, plus the
softmax buffer of `sharded_cross_entropy`: head memory grows with the number of local classes.
This mode computes the same loss and gradients while holding one (B_g x chunk_size) block at a
time, as one autograd.Function over the whole margin softmax:

forward, per block of sampled columns: Wn_b = W_b / ||W_b|| (chunk x d), block = F_s Wn_b^T
(F_s = s * normalize(f)), the margin's modulation of the negatives if it has one (CurricularFace),
target entries replaced by s*psi(cos), then a per-row running max and
running sum of exp (online log-sum-exp). Across ranks the same two all-reduces as
`sharded_cross_entropy`: MAX of the row maxima, then one fused SUM of [sum of exp, positive
logit, has-a-positive]. Only B_g-sized vectors are kept for backward.

backward, per block again: the block is recomputed, P_b = exp(block - m - log s) is the softmax,
the target entries become (P - 1) * psi'(cos)/s, and H_b accumulates dF += H_b Wn_b and gives
dWn_b = H_b^T (c * F_s) (c = dloss/dloss_i per row, folded into the features once), then
dW_b = (dWn_b - Wn_b <Wn_b, dWn_b>) / ||W_b||, the exact derivative of the row normalisation.
The cost is one extra logits GEMM per block (the recompute), no communication in backward.

Peak memory beyond the parameter and its gradient: one (B_g x chunk) block buffer in the softmax
dtype, two (chunk x d) row buffers and a few (B_g x d) feature buffers; nothing of size (B_g x S).
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_max_, all_reduce_sum_
from largefr.heads.margins import NORM_EPS, Margin, MarginStep, NegativeModulation
from largefr.heads.precision import compute_dtype, upcast
from largefr.heads.row_gradient import sparse_row_gradient


class _BlockWorkspace:
    """Buffers reused by every block (a fresh 100 MB buffer per block would cost page faults each time)."""

    def __init__(self, rows: int, chunk_size: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.logits = torch.empty(rows * chunk_size, dtype=dtype, device=device)
        self.weight = torch.empty(chunk_size * dim, dtype=dtype, device=device)
        self.rows, self.dim = rows, dim

    def logits_block(self, width: int) -> torch.Tensor:
        return self.logits[: self.rows * width].view(self.rows, width)

    def weight_block(self, width: int) -> torch.Tensor:
        return self.weight[: width * self.dim].view(width, self.dim)


class _Blocks:
    """The sampled columns of this rank split into blocks, and the target entries of each block."""

    def __init__(self, weight: torch.Tensor, sampled: torch.Tensor | None, chunk_size: int,
                 target_rows: torch.Tensor, target_cols: torch.Tensor):
        self.weight, self.sampled, self.chunk_size = weight, sampled, chunk_size
        self.num_cols = weight.shape[0] if sampled is None else sampled.numel()
        self.target_rows, self.target_cols = target_rows, target_cols

    def ranges(self):
        for start in range(0, self.num_cols, self.chunk_size):
            yield start, min(start + self.chunk_size, self.num_cols)

    def raw_rows(self, start: int, end: int) -> torch.Tensor:
        """W's rows of block [start, end), upcast after the gather when W is stored in half precision."""
        if self.sampled is None:
            return upcast(self.weight[start:end])
        return upcast(self.weight.index_select(0, self.sampled[start:end]))

    def normalized_rows(self, start: int, end: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_b / ||W_b|| written into out, 1 / ||W_b||)."""
        rows = self.raw_rows(start, end)
        inv_norm = torch.linalg.vector_norm(rows, dim=1).clamp_(min=NORM_EPS).reciprocal_()
        torch.mul(rows, inv_norm.unsqueeze(1), out=out)
        return out, inv_norm

    def targets_in(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index into the target list, gathered row, block column) of the targets in [start, end)."""
        inside = torch.nonzero((self.target_cols >= start) & (self.target_cols < end)).squeeze(1)
        return inside, self.target_rows[inside], self.target_cols[inside] - start


def _block_logits(gemm_features: torch.Tensor, normalized_rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """s * cos for one block, written into `out` (softmax dtype); the GEMM runs in gemm_features' dtype."""
    if gemm_features.dtype == out.dtype:
        return torch.mm(gemm_features, normalized_rows.t(), out=out)
    return out.copy_(gemm_features @ normalized_rows.to(gemm_features.dtype).t())


def _target_cosines(features: torch.Tensor, blocks: _Blocks, scale: float) -> torch.Tensor:
    """cos(theta) of each row with its positive on this rank (one dot product per row)."""
    column = blocks.target_cols if blocks.sampled is None else blocks.sampled[blocks.target_cols]
    rows = blocks.weight.index_select(0, column).to(features.dtype)
    norms = torch.linalg.vector_norm(rows, dim=1).clamp_(min=NORM_EPS)
    return torch.linalg.vecdot(features[blocks.target_rows], rows) / norms / scale


def _margin_block(gemm_features: torch.Tensor, blocks: _Blocks, start: int, end: int,
                  workspace: _BlockWorkspace, target_value: torch.Tensor, negatives: NegativeModulation | None):
    """One block's logits with the margin on its target entries: (logits, Wn_b, 1/||W_b||, targets, d modulation).

    negatives: the margin's modulation of the negatives or None; the last item is then the derivative of the
    modulated block w.r.t. s*cos (its target entries are set after it in backward), else None.
    """
    width = end - start
    normalized, inv_norm = blocks.normalized_rows(start, end, workspace.weight_block(width))
    logits = _block_logits(gemm_features, normalized, workspace.logits_block(width))
    index, target_rows, target_cols = blocks.targets_in(start, end)
    derivative = None if negatives is None else negatives.apply_(logits)
    logits[target_rows, target_cols] = target_value[index]
    return logits, normalized, inv_norm, (index, target_rows, target_cols), derivative


class _ChunkedMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scaled_features, weight, sampled, local_target, params, target_fn, scale, negatives, group,
                chunk_size, logits_dtype):
        features = scaled_features.to(compute_dtype(weight.dtype))  # float32 for a half-precision W
        target_rows = torch.nonzero(local_target >= 0).squeeze(1)
        blocks = _Blocks(weight, sampled, chunk_size, target_rows, local_target[target_rows])
        cos_target = _target_cosines(features, blocks, scale)
        target_value = target_fn(cos_target, None if params is None else params.detach())
        row_max, row_sum = _online_logsumexp(features, blocks, target_value, logits_dtype, negatives)
        row_max, sum_exp, positive, valid = _reduce_over_ranks(row_max, row_sum, target_rows, target_value, group)
        num_valid = valid.sum().clamp(min=1)
        log_normalizer = torch.log(sum_exp) + row_max
        loss = torch.where(valid, log_normalizer - positive, torch.zeros_like(row_max)).sum() / num_valid
        ctx.save_for_backward(scaled_features, weight, sampled, local_target, cos_target, target_value, params,
                              log_normalizer, valid, num_valid)
        ctx.target_fn, ctx.scale, ctx.chunk_size, ctx.logits_dtype = target_fn, scale, chunk_size, logits_dtype
        ctx.negatives = negatives
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (scaled_features, weight, sampled, local_target, cos_target, target_value, params, log_normalizer,
         valid, num_valid) = ctx.saved_tensors
        features = scaled_features.to(compute_dtype(weight.dtype))  # float32 for a half-precision W
        target_rows = torch.nonzero(local_target >= 0).squeeze(1)
        blocks = _Blocks(weight, sampled, ctx.chunk_size, target_rows, local_target[target_rows])
        row_coef = (grad_loss / num_valid) * valid.to(features.dtype)  # dL/dloss_i of every gathered row
        # dL/d(target logit) of each local target row: c_i * (softmax of the target - 1)
        target_upstream = row_coef[target_rows] * (torch.exp(target_value - log_normalizer[target_rows]) - 1.0)
        target_slope, grad_params = _target_slopes(cos_target, params, ctx.target_fn, ctx.scale, target_upstream,
                                                   ctx.needs_input_grad[4])
        grad_features, grad_weight_rows = _blocked_backward(features, blocks, row_coef, log_normalizer,
                                                            target_value, target_slope, ctx.logits_dtype,
                                                            ctx.negatives)
        grad_features = grad_features.to(scaled_features.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_weight_rows.to(weight.dtype)
            if sampled is not None:
                grad_weight = sparse_row_gradient(sampled, grad_weight, weight.shape)
        return grad_features, grad_weight, None, None, grad_params, None, None, None, None, None, None


def _online_logsumexp(features: torch.Tensor, blocks: _Blocks, target_value: torch.Tensor,
                      logits_dtype: torch.dtype,
                      negatives: NegativeModulation | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-row max and sum of exp(logit - max) over its sampled columns, block by block."""
    rows, dim = features.shape
    row_max = torch.full((rows,), float("-inf"), dtype=features.dtype, device=features.device)
    row_sum = torch.zeros(rows, dtype=features.dtype, device=features.device)
    workspace = _BlockWorkspace(rows, min(blocks.chunk_size, blocks.num_cols), dim, features.dtype, features.device)
    gemm_features = features.to(logits_dtype)  # cast once, not per block
    for start, end in blocks.ranges():
        logits, *_ = _margin_block(gemm_features, blocks, start, end, workspace, target_value, negatives)
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        row_sum.mul_(torch.exp(row_max - new_max))  # first block: exp(-inf) = 0 times the empty sum
        row_sum.add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
        row_max = new_max
    return row_max, row_sum


def _reduce_over_ranks(row_max, row_sum, target_rows, target_value, group):
    """Global (max, sum of exp(logit - max), positive logit, row has a positive): two all-reduces."""
    local_max = row_max.clone()
    all_reduce_max_(row_max, group)
    positive = torch.zeros_like(row_sum).index_put_((target_rows,), target_value.to(row_sum.dtype))
    has_target = torch.zeros_like(row_sum).index_fill_(0, target_rows, 1.0)
    # a rank without columns has local max -inf and sum 0: exp(-inf - m) = 0 keeps it out of the sum
    fused = torch.stack([row_sum * torch.exp(local_max - row_max), positive, has_target])
    all_reduce_sum_(fused, group)
    return row_max, fused[0], fused[1], fused[2] > 0.5


def _target_slopes(cos_target: torch.Tensor, params: torch.Tensor | None, target_fn, scale: float,
                   target_upstream: torch.Tensor, params_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d(target logit)/d(s*cos) per target row = psi'(cos), dL/dparams or None): the margin's exact derivatives."""
    with torch.enable_grad():
        cos_leaf = cos_target.detach().requires_grad_(True)
        params_leaf = None if params is None else params.detach().requires_grad_(params_grad)
        value = target_fn(cos_leaf, params_leaf)
        (slope,) = torch.autograd.grad(value.sum(), cos_leaf, retain_graph=params_grad)
        grad_params = torch.autograd.grad(value, params_leaf, target_upstream)[0] if params_grad else None
    return slope / scale, grad_params


def _blocked_backward(features, blocks: _Blocks, row_coef, log_normalizer, target_value, target_slope,
                      logits_dtype, negatives: NegativeModulation | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dF_s, dL/dW of the sampled rows, in their order): each block's softmax is recomputed and turned
    into its share of the gradients."""
    rows, dim = features.shape
    width_max = min(blocks.chunk_size, blocks.num_cols)
    weighted_features = (features * row_coef.unsqueeze(1)).to(logits_dtype)  # c_i * F_s, folded into dW once
    grad_features = torch.zeros_like(features)
    full = blocks.sampled is None
    # the whole shard's gradient, or (sample rate < 1) the sampled rows' only, returned as a sparse row gradient
    grad_weight = torch.empty((blocks.num_cols, dim), dtype=features.dtype, device=features.device)
    workspace = _BlockWorkspace(rows, width_max, dim, features.dtype, features.device)
    gemm_features = features.to(logits_dtype)
    for start, end in blocks.ranges():
        logits, normalized, inv_norm, (index, target_rows, target_cols), derivative = _margin_block(
            gemm_features, blocks, start, end, workspace, target_value, negatives)
        softmax = logits.sub_(log_normalizer.unsqueeze(1)).exp_()
        target_softmax = softmax[target_rows, target_cols]
        if derivative is not None:  # the modulation's derivative (CurricularFace: t + 2c on the hard negatives)
            derivative.mul_(softmax)
        # target entries: (softmax - onehot) times the margin's slope d psi / d cos
        softmax[target_rows, target_cols] = (target_softmax - 1.0) * target_slope[index]
        _accumulate_block_gradients(softmax, normalized, inv_norm, weighted_features, grad_features,
                                    grad_weight[start:end], logits_dtype)
    return grad_features.mul_(row_coef.unsqueeze(1)), grad_weight


def _accumulate_block_gradients(softmax, normalized, inv_norm, weighted_features, grad_features, block_grad,
                                logits_dtype) -> None:
    """grad_features += H Wn_b; block_grad = d/dW_b through the row normalisation (written in place)."""
    if logits_dtype == softmax.dtype:
        grad_features.addmm_(softmax, normalized)
        torch.mm(softmax.t(), weighted_features, out=block_grad)
    else:
        low = softmax.to(logits_dtype)
        grad_features.add_(low @ normalized.to(logits_dtype))
        block_grad.copy_(low.t() @ weighted_features)
    # dW = (dWn - Wn <Wn, dWn>) / ||W||: remove the radial part, then undo the normalisation's scale
    radial = torch.linalg.vecdot(normalized, block_grad)
    block_grad.addcmul_(normalized, radial.unsqueeze(1), value=-1.0).mul_(inv_norm.unsqueeze(1))


def chunked_margin_loss(scaled_features: torch.Tensor, weight: torch.Tensor, sampled: torch.Tensor | None,
                        local_target: torch.Tensor, margin: Margin, step: MarginStep, *,
                        group: ProcessGroup | None, chunk_size: int,
                        logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean margin-softmax loss over the gathered rows, computed block by block (same value on every rank).

    scaled_features: (B_g, d) s * normalize(f), with grad. weight: (num_local, d) this rank's raw rows.
    sampled: sorted local rows used this step (Partial FC), None = all rows. local_target: (B_g,) column
    of the row's positive among the sampled columns, -1 when it lives elsewhere or the row is ignored.
    margin, step: the head's margin and what its `step` returned for this batch (the target rows'
    params, in `nonzero(local_target >= 0)` order; the modulation of the negatives, if any); the extra
    loss of the step is the caller's. chunk_size: sampled columns per block (> 0).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (classes per block of the low-memory head)")
    if scaled_features.dim() != 2 or local_target.shape != scaled_features.shape[:1]:
        raise ValueError(f"expected features (B_g, d) and local_target (B_g,), got {tuple(scaled_features.shape)} "
                         f"and {tuple(local_target.shape)}")
    return _ChunkedMarginSoftmax.apply(scaled_features, weight, sampled, local_target.long(), step.params,
                                       margin.target_logit, margin.scale, step.negatives, group, int(chunk_size),
                                       logits_dtype)
