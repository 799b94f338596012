"""Class-partitioned margin softmax head (Partial FC style) over a process group.

Each rank of `group` holds the rows of W for its class range (ClassPartition). A step all-gathers
the embeddings (autograd: backward is a reduce-scatter) and labels, samples this rank's classes
(Partial FC), computes the local logits s*cos(theta) with the margin on the target column, and
feeds them to `sharded_cross_entropy`. Nothing of size (global batch x num_classes) or
(num_classes x d) is allocated on one rank; with sampling, W's gradient is a sparse tensor over the
sampled rows (`largefr.heads.row_gradient`), so the step's cost follows the sample, not the shard.
Rows another term of the step reads (L_ali's classes, `shared_rows`) are gathered in the same block,
their columns masked out of the softmax, so W gets one gradient a step.

Elementwise work on the (B_g x S) logits is kept to in-place passes: W is never normalised into a
copy (the GEMM uses raw rows and the logits are scaled by 1/||W_j|| in place), the margin rewrites
only the B_g target entries, and the backward reuses the softmax buffer of the cross entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largefr.choices import ADAPTIVE_MARGIN_TYPES
from largefr.config import HeadConfig
from largefr.distributed.collectives import (all_gather_rows, all_gather_with_grad, all_reduce_sum_, group_rank,
                                            group_size)
from largefr.distributed.cross_entropy import sharded_cross_entropy
from largefr.distributed.partition import ClassPartition
from largefr.heads.chunked import chunked_margin_loss
from largefr.heads.margins import NORM_EPS, Margin, MarginBatch, MarginStep, NegativeModulation, build_margin
from largefr.heads.precision import compute_dtype, upcast
from largefr.heads.row_gradient import GatheredRows, gather_rows, with_rows_of_block
from largefr.heads.sampling import contains_sorted, uniform_complement_subset, union_of_sorted
from largefr.heads.spare import SpareBuffers
from largefr.stateful import EntryNote, Kind, RestoreContext, State, capture_generator_state, restore_samplers

ROWS_PER_INIT_CHUNK = 4096
"""Rows generated per seeded chunk at init. Changing it changes every initial W: keep it fixed."""
_SAMPLE_STREAM = 0x5A3D_17C4_9E21_0B6F  # separates the sampling seed from the init seeds
_MARGIN_STREAM = 0x2C6E_B9A1_04F7_D853  # ElasticFace's margin draws: same seed on every rank


def _mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed from (seed, index) via splitmix64, so nearby pairs give unrelated streams."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def normal_rows(start: int, end: int, dim: int, *, std: float, seed: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, end) of one global N(0, std^2) matrix defined by `seed` (CPU tensor).

    Row k depends only on k and seed: it comes from the seeded chunk k // ROWS_PER_INIT_CHUNK, so
    any split of the rows over ranks yields the same matrix and no rank materialises all of it.
    """
    gen_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.empty((end - start, dim), dtype=gen_dtype)
    chunk = start // ROWS_PER_INIT_CHUNK
    while chunk * ROWS_PER_INIT_CHUNK < end:
        chunk_start = chunk * ROWS_PER_INIT_CHUNK
        generator = torch.Generator().manual_seed(_mix_seed(seed, chunk))
        values = torch.randn((ROWS_PER_INIT_CHUNK, dim), generator=generator, dtype=gen_dtype)
        lo, hi = max(start, chunk_start), min(end, chunk_start + ROWS_PER_INIT_CHUNK)
        out[lo - start:hi - start] = values[lo - chunk_start:hi - chunk_start]
        chunk += 1
    return out.mul_(std).to(dtype)


class _CosineLogits(torch.autograd.Function):
    """logits = scaled_features @ normalize(W_rows)^T without a normalised copy of W.

    Forward: GEMM on the raw rows, then the columns are scaled by 1/||W_j|| in place.
    Backward: G' = G * inv_norm (in place on G, which the margin/cross entropy hand over as a
    buffer nobody else holds), dF = G' W, dW = G'^T F - inv_norm^2 * W * <W, G'^T F> (row-wise):
    the exact derivative of the row normalisation.
    With `spare` (CPU) the logits are written into a handed-back buffer, and the backward hands back the logits'
    gradient (the same buffer, after the cross entropy consumed it) and, when `rows_are_spare`, the gathered rows;
    their gradient is then written into a lent buffer, which comes back once the head step has dropped W's gradient.
    """

    @staticmethod
    def forward(ctx, scaled_features: torch.Tensor, weight_rows: torch.Tensor, logits_dtype: torch.dtype,
                spare: SpareBuffers | None, rows_are_spare: bool):
        inv_norm = torch.linalg.vector_norm(weight_rows, dim=1).clamp_(min=NORM_EPS).reciprocal_()
        ctx.save_for_backward(scaled_features, weight_rows, inv_norm)
        ctx.logits_dtype = logits_dtype
        same_dtype = logits_dtype == weight_rows.dtype  # (low precision: the buffers differ; none are reused)
        ctx.spare = spare if same_dtype else None
        ctx.rows_are_spare = rows_are_spare and same_dtype
        if same_dtype:
            shape = (scaled_features.shape[0], weight_rows.shape[0])
            out = None if ctx.spare is None else ctx.spare.take(shape, logits_dtype, weight_rows.device)
            logits = torch.mm(scaled_features.to(logits_dtype), weight_rows.t(), out=out)
            ctx.logits_memory = logits.untyped_storage().data_ptr()
            return logits.mul_(inv_norm)
        # low precision: normalise before the cast so the scaling is done in full precision
        normalized = (weight_rows * inv_norm.unsqueeze(1)).to(logits_dtype)
        return scaled_features.to(logits_dtype) @ normalized.t()

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        features, weight_rows, inv_norm = ctx.saved_tensors
        low_precision = ctx.logits_dtype != weight_rows.dtype
        if low_precision:
            weight_mm = (weight_rows * inv_norm.unsqueeze(1)).to(ctx.logits_dtype)
        else:
            grad_logits = grad_logits.mul_(inv_norm)  # in place: buffer owned by this backward chain
            weight_mm = weight_rows
        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = (grad_logits @ weight_mm).to(features.dtype)
        if ctx.rows_are_spare:  # the rows' gradient, read last by the head optimizer: lent, back once unused
            grad_weight = torch.mm(grad_logits.t(), features.to(ctx.logits_dtype),
                                   out=ctx.spare.lend(weight_rows.shape, weight_rows.dtype, weight_rows.device))
        else:
            grad_weight = (grad_logits.t() @ features.to(ctx.logits_dtype)).to(weight_rows.dtype)
        if low_precision:
            grad_weight.mul_(inv_norm.unsqueeze(1))
        # grad_weight now holds inv_norm * dL/dWn; remove the radial component of each row
        _remove_radial_component_(grad_weight, weight_rows, inv_norm)
        if ctx.spare is not None:  # read for the last time: the logits' buffer (now their gradient), the rows
            mine = grad_logits.untyped_storage().data_ptr() == ctx.logits_memory  # (not a gradient made elsewhere)
            ctx.spare.give(*([grad_logits.detach()] if mine else []),
                           *([weight_rows.detach()] if ctx.rows_are_spare else []))
        return grad_features, grad_weight, None, None, None


_RADIAL_BLOCK_ROWS_CPU = 128  # two blocks of 128 x 512 floats stay in L2 between the dot and the update
_RADIAL_BLOCK_ROWS_GPU = 16384  # ~3 kernel launches per block; temporaries of 16384 x d (32 MB at d=512)


def radial_block_rows(device: torch.device) -> int:
    """Rows per block of the radial correction: cache-sized on CPU, large on a GPU (launches, not cache, cost)."""
    return _RADIAL_BLOCK_ROWS_CPU if device.type == "cpu" else _RADIAL_BLOCK_ROWS_GPU


def _remove_radial_component_(grad_weight: torch.Tensor, weight_rows: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """grad_j -= inv_j^2 * <W_j, grad_j> * W_j, in place, block by block.

    One fused pass instead of a full-size product temporary (vecdot) plus a second pass:
    each block is read from memory once and updated while it is still in cache.
    """
    inv_square = inv_norm.square()
    block = radial_block_rows(grad_weight.device)
    for start in range(0, grad_weight.shape[0], block):
        rows = slice(start, start + block)
        radial = torch.linalg.vecdot(weight_rows[rows], grad_weight[rows]).mul_(inv_square[rows])
        grad_weight[rows].addcmul_(weight_rows[rows], radial.unsqueeze(1), value=-1.0)


class _MarginInPlace(torch.autograd.Function):
    """The margin on a block of s*cos logits, in place; exact backward.

    Forward: the target cosines read, the margin's `negatives` modulation (if any) on the whole block,
    then the B_g target entries [rows, cols] overwritten with `target_fn(cos, params)` = s*psi_i(cos), and the
    `masked` columns (rows of W in the block for another term only) set to -inf: outside the softmax.
    Backward (on the cross entropy's softmax buffer, held by nobody else): the block times the
    modulation's derivative, then the target entries set to their upstream gradient times psi'(cos)
    (and the params' gradient, e.g. MagFace's margin from the norm).
    """

    @staticmethod
    def forward(ctx, logits, rows, cols, target_fn, scale: float, params, negatives: NegativeModulation | None,
                masked: torch.Tensor | None):
        compute_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        cos_target = logits[rows, cols].to(compute_dtype) / scale
        ctx.derivative = None if negatives is None else negatives.apply_(logits)
        logits[rows, cols] = target_fn(cos_target, params).to(logits.dtype)
        if masked is not None:  # columns outside the softmax: -inf, so their softmax and gradient are 0
            logits[:, masked] = float("-inf")
        ctx.mark_dirty(logits)
        ctx.save_for_backward(cos_target, rows, cols, params)
        ctx.target_fn, ctx.scale = target_fn, scale
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        cos_target, rows, cols, params = ctx.saved_tensors
        params_grad = ctx.needs_input_grad[5]
        upstream = grad_logits[rows, cols].to(cos_target.dtype)
        if ctx.derivative is not None:
            ctx.derivative.mul_(grad_logits)
        with torch.enable_grad():
            cos_leaf = cos_target.detach().requires_grad_(True)
            params_leaf = None if params is None else params.detach().requires_grad_(params_grad)
            logit = ctx.target_fn(cos_leaf, params_leaf)
            grads = torch.autograd.grad(logit, (cos_leaf, params_leaf) if params_grad else (cos_leaf,), upstream)
        grad_logits[rows, cols] = (grads[0] / ctx.scale).to(grad_logits.dtype)
        return grad_logits, None, None, None, None, grads[1] if params_grad else None, None, None


class ShardedMarginHead(nn.Module):
    """Margin softmax classifier whose rows are split over the ranks of `group` (Partial FC).

    num_classes: K over all ranks; this rank holds rows [partition.start, partition.end).
    margin: the head section of the config: head.type and its fields pick the margin (`largefr.heads.margins`;
        the section's other settings are this constructor's arguments). The built margin is `self.margin`,
        whose `state_dict()` is its running state; CG-ArcFace's per-class lambda comes at forward time.
    sample_rate: Partial FC rate in (0, 1]; each rank keeps the positives of the global batch in
        its range plus uniform random negatives up to ceil(sample_rate * num_local).
    group: process group whose ranks share the classes (None: default group, or no
        torch.distributed at all = one rank).
    init_std: W ~ N(0, init_std^2); row k depends only on k and the seed (see `normal_rows`).
    logits_dtype: dtype of the logits GEMMs (float32 default; bfloat16 allowed, the softmax is
        always computed in float32 by sharded_cross_entropy).
    generator: source of the seed (its initial_seed(); torch.initial_seed() when None). Seed it
        identically on every rank so W does not depend on the world size.
    chunk_size: 0 = default mode; > 0 = low-memory mode (`largefr.heads.chunked`): logits computed
        over blocks of chunk_size sampled classes and recomputed in backward, same loss and gradients.
    device: 'meta' builds W without values (shapes only, for dry runs of jobs larger than the machine).
    dtype: W's storage dtype (head.weight_dtype): float32, or bfloat16 (the float32 init rounded to nearest), whose
        sampled rows are upcast after the gather and computed in float32 (`largefr.heads.precision`); W's gradient
        is then a bfloat16 sparse row gradient (autograd keeps a parameter's gradient in its dtype).
    """

    def __init__(self, num_classes: int, embedding_size: int, *, margin: HeadConfig, sample_rate: float = 1.0,
                 group: ProcessGroup | None = None, init_std: float = 0.01,
                 logits_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, chunk_size: int = 0):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} must be in (0, 1] (1.0 = no Partial FC sampling)")
        if embedding_size < 1:
            raise ValueError(f"embedding_size={embedding_size} must be >= 1")
        if chunk_size < 0:
            raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0 = default mode, > 0 = classes per block)")
        self.chunk_size = int(chunk_size)
        self.sample_rate = float(sample_rate)
        self.group = group
        self.logits_dtype = logits_dtype
        self.partition = ClassPartition(num_classes, group_size(group), group_rank(group))
        # ceil without float noise: 0.1 * 30 must give 3, not 4
        self.num_sample = min(self.partition.num_local, math.ceil(self.sample_rate * self.partition.num_local - 1e-9))
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        on_meta = device is not None and torch.device(device).type == "meta"
        if on_meta:  # no values to draw; a CPU sampler keeps the module's state complete
            rows = torch.empty((self.partition.num_local, embedding_size), dtype=dtype, device="meta")
        else:
            rows = normal_rows(self.partition.start, self.partition.end, embedding_size, std=init_std, seed=seed,
                               dtype=dtype).to(device)
        self.weight = nn.Parameter(rows)
        self.sample_generator = torch.Generator(device="cpu" if on_meta else self.weight.device)
        self.sample_generator.manual_seed(_mix_seed(seed ^ _SAMPLE_STREAM, self.partition.rank))
        self.last_sampled: torch.Tensor | None = None
        self.shared_block: torch.Tensor | None = None
        self.last_gathered: GatheredRows | None = None
        """W's rows of the last forward's block as it gathered them into a spare buffer (CPU, sampling, W stored in
        the compute dtype), for the head optimizer; None where the forward made no such copy."""
        self.margin: Margin = build_margin(margin, seed=_mix_seed(seed ^ _MARGIN_STREAM, 0), device=self.weight.device)
        self.spare = SpareBuffers()
        """On CPU the step's largest temporaries (the sampled rows, the logits buffer), handed back by its backward
        for the next step, and the rows' gradient, lent until the head step drops it (`largefr.heads.spare`)."""

    def held_tensors(self) -> list[torch.Tensor]:
        """What the head keeps between steps besides W: the spare buffers, the margin's (`Margin.held_tensors`)."""
        return [*self.spare.held_tensors(), *self.margin.held_tensors()]

    @property
    def adaptive(self) -> Margin | None:
        """The margin when head.type is an adaptive one (its state_dict is the checkpoint's margin_state, which the
        fixed ones do not write), else None; `self.margin` is the margin in both cases."""
        return self.margin if self.margin.name in ADAPTIVE_MARGIN_TYPES else None

    @property
    def num_classes(self) -> int:
        return self.partition.num_classes

    def extra_repr(self) -> str:
        p = self.partition
        return (f"classes={p.num_classes}, local=[{p.start}, {p.end}), dim={self.weight.shape[1]}, "
                f"sample_rate={self.sample_rate}, chunk_size={self.chunk_size}")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                class_lambda: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the global batch (same value on every rank of the group).

        local_embeddings: (B, d) this rank's rows, not normalised; every rank passes the same B.
        local_labels: (B,) global class ids, -1 marks a row to ignore.
        class_lambda: (num_local,) lambda of this rank's classes, or None (= 1, plain margin): a tensor or
            anything indexed like one (`largefr.heads.cluster.ClassLambda` computes only the rows a step reads).
        """
        if local_embeddings.dim() != 2 or local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(f"expected embeddings (B, d) and labels (B,), got {tuple(local_embeddings.shape)} "
                             f"and {tuple(local_labels.shape)}")
        features = all_gather_with_grad(local_embeddings, self.group)
        labels = all_gather_rows(local_labels.to(device=self.weight.device, dtype=torch.long), self.group)
        return self.loss_from_gathered(features, labels, class_lambda)

    def loss_from_gathered(self, features: torch.Tensor, labels: torch.Tensor,
                           class_lambda: torch.Tensor | None = None, *,
                           shared_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Loss from the gathered (B_g, d) features (with grad, not normalised) and (B_g,) labels.

        shared_rows: sorted, unique local rows of W another term of the step reads (L_ali's classes). In the default
        mode with sampling they are gathered in the same block as the sample, outside the margin's softmax (their
        logits are masked), so W gets one row gradient a step; `self.shared_block` is then their rows (with grad),
        else None (the caller gathers them from W).
        """
        labels = labels.long()
        self._check_inputs(features, labels, class_lambda)
        self.shared_block = None
        if self.last_gathered is not None:  # this forward may write its memory
            self.last_gathered.expire()
            self.last_gathered = None
        sampled, local_target = self.sample_classes(labels)
        self.last_sampled = sampled
        full = sampled.numel() == self.partition.num_local
        features = features.to(compute_dtype(self.weight.dtype))
        scaled = F.normalize(features, dim=1, eps=NORM_EPS) * self.margin.scale
        rows = torch.nonzero(local_target >= 0).squeeze(1)
        cols = local_target[rows]
        row_lambda = None if class_lambda is None else class_lambda[sampled[cols]].detach()
        batch = MarginBatch(features=features, labels=labels, rows=rows, row_lambda=row_lambda, group=self.group)
        if self.margin.needs_target_facts:
            batch.target_cos, batch.global_lambda = self._global_target_facts(scaled, labels, sampled, rows, cols,
                                                                              row_lambda)
        step = self.margin.step(batch)
        if self.chunk_size > 0:
            loss = chunked_margin_loss(scaled, self.weight, None if full else sampled, local_target, self.margin,
                                       step, group=self.group, chunk_size=self.chunk_size,
                                       logits_dtype=self.logits_dtype)
        else:
            loss = self._block_loss(scaled, sampled, None if full else shared_rows, local_target, rows, cols, step)
        return loss if step.extra_loss is None else loss + step.extra_loss

    def _block_loss(self, scaled: torch.Tensor, sampled: torch.Tensor, shared_rows: torch.Tensor | None,
                    local_target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    step: MarginStep) -> torch.Tensor:
        """The default mode: the logits of every column of the block at once. The block is the sample plus the
        shared rows not in it, whose columns are masked out of the softmax (loss and gradients those of the sample
        alone); `local_target` and `cols` index the sample and are moved to the block's columns."""
        full = sampled.numel() == self.partition.num_local
        block, masked = sampled, None
        extra = None if shared_rows is None else shared_rows[~contains_sorted(sampled, shared_rows)]
        if extra is not None and extra.numel() > 0:
            block = union_of_sorted(sampled, extra)
            masked = torch.searchsorted(sampled, extra) + torch.arange(extra.numel(), device=extra.device)

            def column(sample_column: torch.Tensor) -> torch.Tensor:  # a sample column's column in the block
                return sample_column + torch.searchsorted(extra, sampled[sample_column])

            local_target = torch.where(local_target >= 0, column(local_target.clamp(min=0)), local_target)
            cols = column(cols)
        spare = self.spare if self.weight.device.type == "cpu" else None
        rows_are_spare = spare is not None and not full and compute_dtype(self.weight.dtype) == self.weight.dtype
        out = spare.take((block.numel(), self.weight.shape[1]), self.weight.dtype, self.weight.device) \
            if rows_are_spare else None
        weight_rows = upcast(self.weight if full else gather_rows(self.weight, block, out))  # W's grad: these rows
        if rows_are_spare:  # kept in the spare buffer until the next forward: the head optimizer reads W's rows there
            self.last_gathered = GatheredRows(self.weight, block, weight_rows.detach())
        if shared_rows is not None:
            weight_rows, self.shared_block = with_rows_of_block(weight_rows, torch.searchsorted(block, shared_rows))
        logits = _CosineLogits.apply(scaled, weight_rows, self.logits_dtype, spare, rows_are_spare)
        logits = _MarginInPlace.apply(logits, rows, cols, self.margin.target_logit, self.margin.scale,
                                      step.params, step.negatives, masked)
        return sharded_cross_entropy(logits, local_target, self.group, consume_logits=True)

    @torch.no_grad()
    def _global_target_facts(self, scaled: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor,
                             rows: torch.Tensor, cols: torch.Tensor,
                             row_lambda: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_g,) target cosine and lambda of every gathered row, from the rank owning its class (one all-reduce);
        0 and 1 where the row is ignored."""
        weight_rows = upcast(self.weight.index_select(0, sampled[cols]))
        norms = torch.linalg.vector_norm(weight_rows, dim=1).clamp(min=NORM_EPS)
        facts = torch.zeros((2, labels.shape[0]), dtype=scaled.dtype, device=scaled.device)
        facts[0, rows] = torch.linalg.vecdot(scaled[rows], weight_rows.to(scaled.dtype)) / norms / self.margin.scale
        facts[1, rows] = 1.0 if row_lambda is None else row_lambda.to(scaled.dtype)
        all_reduce_sum_(facts, self.group)
        facts[1, labels < 0] = 1.0
        return facts[0], facts[1]

    @torch.no_grad()
    def sample_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted local row indices used this step, local target column per row or -1).

        The positives of `labels` in this rank's range are always kept; uniform random negatives
        (from `sample_generator`) fill up to num_sample; more positives than that are all kept. The cost
        follows the sample, not the rank's classes (`largefr.heads.sampling`).
        """
        start, num_local = self.partition.start, self.partition.num_local
        local = (labels >= start) & (labels < self.partition.end)
        local_labels = torch.where(local, labels - start, torch.zeros_like(labels))
        if self.num_sample >= num_local:
            sampled = torch.arange(num_local, device=labels.device)
            return sampled, torch.where(local, local_labels, torch.full_like(labels, -1))
        positives = torch.unique(local_labels[local])
        negatives = uniform_complement_subset(num_local, positives, max(0, self.num_sample - positives.numel()),
                                              generator=self.sample_generator)
        sampled = union_of_sorted(negatives, positives)  # disjoint and sorted: a merge, not a sort
        local_target = torch.searchsorted(sampled, local_labels)
        return sampled, torch.where(local, local_target, torch.full_like(labels, -1))

    def _check_inputs(self, features: torch.Tensor, labels: torch.Tensor, class_lambda: torch.Tensor | None) -> None:
        if features.dim() != 2 or features.shape[1] != self.weight.shape[1] or labels.shape != features.shape[:1]:
            raise ValueError(f"expected features (B_g, {self.weight.shape[1]}) and labels (B_g,), got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        if class_lambda is not None and class_lambda.shape != (self.partition.num_local,):
            raise ValueError(f"class_lambda has shape {tuple(class_lambda.shape)}; expected "
                             f"({self.partition.num_local},): the lambda of this rank's classes "
                             f"[{self.partition.start}, {self.partition.end})")
        bad = (labels < -1) | (labels >= self.num_classes)
        if labels.device.type != "cpu":  # no host sync per step: the check waits on the device, the message is lost
            torch._assert_async(~bad.any(), f"a label is outside [0, {self.num_classes}) (use -1 to ignore a row); "
                                "check the dataset's num_classes")
            return
        if labels.numel() and bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"label {int(labels[row])} at gathered row {row} is outside [0, {self.num_classes}) "
                             "(use -1 to ignore a row); check the dataset's num_classes")

    # ---- checkpoint (largefr/stateful.py) -------------------------------------------------------------------
    def checkpoint_state(self) -> State:
        """W's rows, the Partial FC sampler (this rank's, so a resumed run draws the same negatives) and the
        adaptive margin's running state (replicated)."""
        state: State = {Kind.ROWS: {"weight": self.weight.detach()},
                        Kind.PER_RANK: {"margin_sampler": capture_generator_state(self.sample_generator)},
                        Kind.REPLICATED: {}}
        if self.adaptive is not None:  # the one place the margin's running state is saved
            state[Kind.REPLICATED]["margin_state"] = self.adaptive.state_dict()
        return state

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        """W's rows were read in place; the sampler (same world size only) and the running margin state."""
        if Kind.PER_RANK in state:
            restore_samplers({"margin_sampler": self.sample_generator}, state[Kind.PER_RANK], context)
        if self.adaptive is not None:  # the one place the margin's running state is restored
            self.adaptive.load_state_dict(state[Kind.REPLICATED]["margin_state"])

    @staticmethod
    def checkpoint_note(name: str) -> EntryNote | None:
        return _CHECKPOINT_NOTES.get(name)


_CHECKPOINT_NOTES = {
    "weight": EntryNote("the classifier's rows", "every run; model.embedding_size sets their width"),
    "margin_sampler": EntryNote("the Partial FC sampler's state", "every run"),
    "margin_state": EntryNote("the running margin state", "head.type curricularface, magface, adaface or elasticface"),
}
"""What each checkpoint entry of the margin head is, for error messages (`largefr.stateful.Stateful`)."""
