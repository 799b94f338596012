"""Sampling of cluster centers across ranks, and the two cluster losses (docs/DESIGN.md section 5).

Both losses are `sharded_cross_entropy` calls: rows replicated on every rank, columns = this
rank's sampled classes.

- L_Clu-Con (Eq. 6): rows = the global batch's normalized features F (with grad), columns =
  sampled centers C_j (detached) divided by a per-class temperature (detached).
- L_Clu-Ali (Eq. 7): rows = all M sampled centers (gathered, detached), columns = normalized
  classifier rows W_j of this rank's sampled classes (with grad), divided by a learnable tau.

Sampling share rule: every rank takes ALL positives of the global batch in its range that have
a center; the remaining budget `min(M, available) - positives` (never negative) is split over
ranks in proportion to each rank's count of non-positive classes with a center (largest
remainder, ties to the lower rank), which never exceeds what a rank has. Every rank computes
the same shares from one all-gather of [available, positives] counts, so the total is M, or
every class with a center when fewer exist, or the number of positives when they exceed M.

Temperature statistics: PCL mode needs the 10th/90th percentiles and the mean of phi. They are
taken over the M gathered sampled classes (all positives plus uniform random negatives), which
every rank already holds: identical on every rank and no extra collective. With M = 2048 the
sampled percentile is within about +-1.3 percentile points of the global one (binomial standard
deviation). Sampled classes without a phi (degenerate, see cluster.py) get the largest sampled
phi, as PCL does for singleton clusters.

Learnable temperatures (L_ali's tau; L_con's tau0 in temperature_mode 'learnable'): each rank's
backward only sees its own columns, so d(loss)/d(log tau) is a partial sum per rank.
`sum_grad_across_ranks` is an identity whose backward all-reduces the gradient, so every rank's
gradient is the full gradient and the temperature stays identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from largefr.choices import PHI_TEMPERATURE_MODES
from largefr.distributed.collectives import all_gather_rows, all_reduce_sum_, group_size
from largefr.distributed.cross_entropy import sharded_cross_entropy
from largefr.distributed.partition import ClassPartition
from largefr.heads.cluster import ClusterBank
from largefr.heads.precision import upcast
from largefr.heads.row_gradient import gather_rows
from largefr.heads.sampling import position_in_sorted, union_of_sorted, uniform_masked_subset



@dataclass(frozen=True)
class SampledCenters:
    """The M classes sampled this step; gathered tensors are identical on every rank, in rank order."""

    local_indices: torch.Tensor
    """(n_local,) sorted local rows of this rank's shard that were sampled."""
    counts: list[int]
    """Number of sampled classes per rank."""
    offset: int
    """Row of this rank's first sampled class in the gathered tensors."""
    centers: torch.Tensor
    """(M_total, d) sampled normalized centers of all ranks, detached."""
    phi: torch.Tensor
    """(M_total,) their concentrations (meaningful only where has_phi)."""
    has_phi: torch.Tensor
    """(M_total,) bool."""
    class_ids: torch.Tensor
    """(M_total,) global class ids."""

    @property
    def total(self) -> int:
        return sum(self.counts)


def sampling_shares(available: list[int], positives: list[int], num_samples: int) -> list[int]:
    """Per-rank number of classes to sample (see the module docstring for the rule)."""
    negatives = [a - p for a, p in zip(available, positives)]
    pool = sum(negatives)
    budget = max(0, min(num_samples, sum(available)) - sum(positives))
    if budget == 0 or pool == 0:
        return list(positives)
    extra = [budget * n // pool for n in negatives]
    remainders = [budget * n % pool for n in negatives]
    leftover = budget - sum(extra)
    for rank in sorted(range(len(negatives)), key=lambda r: (-remainders[r], r))[:leftover]:
        extra[rank] += 1
    return [p + e for p, e in zip(positives, extra)]


def _gather_known_rows(tensor: torch.Tensor, counts: list[int], group: ProcessGroup | None) -> torch.Tensor:
    """All-gather rows when every rank already knows every rank's row count (one collective)."""
    if group_size(group) == 1:
        return tensor
    longest = max(counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_rows(padded, group).view(len(counts), longest, *tensor.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)], dim=0)


@torch.no_grad()
def sample_centers(bank: ClusterBank, global_labels: torch.Tensor, num_samples: int, *,
                   generator: torch.Generator | None = None) -> SampledCenters:
    """Sample up to `num_samples` classes with a center over the ranks of `bank.group`, positives first.

    Collective (three all-gathers on the bank's group, so the class split and the collectives
    cannot disagree); `global_labels` must be identical on every rank. Negatives are uniform
    among this rank's non-positive classes with a center, drawn with `generator` (on the bank's
    device; None = torch's default generator).
    """
    part, group = bank.partition, bank.group
    labels = global_labels.to(bank.seen.device)
    positives = torch.unique(labels[(labels >= part.start) & (labels < part.end)] - part.start)
    positives = positives[bank.seen[positives]]  # sorted local rows of the batch's classes with a center
    seen = bank.seen_count()
    local_counts = torch.tensor([[seen, positives.numel()]], dtype=torch.int64, device=bank.seen.device)
    all_counts = all_gather_rows(local_counts, group).tolist()
    shares = sampling_shares([c[0] for c in all_counts], [c[1] for c in all_counts], num_samples)

    negatives = uniform_masked_subset(bank.seen, positives, seen - positives.numel(),
                                      max(0, shares[part.rank] - positives.numel()), generator=generator,
                                      listed=bank.seen_rows())
    local_indices = union_of_sorted(positives, negatives)

    if max(shares) == 0:
        gathered = torch.zeros(0, bank.centers.shape[1] + 2, dtype=bank.phi.dtype, device=bank.centers.device)
        class_ids = torch.zeros(0, dtype=torch.int64, device=bank.centers.device)
    else:
        payload = torch.cat([bank.centers[local_indices].to(bank.phi.dtype), bank.phi[local_indices, None],
                             bank.has_phi[local_indices, None].to(bank.phi.dtype)], dim=1)
        gathered = _gather_known_rows(payload, shares, group)
        class_ids = _gather_known_rows(local_indices + part.start, shares, group)
    return SampledCenters(local_indices=local_indices, counts=shares, offset=sum(shares[: part.rank]),
                          centers=gathered[:, :-2], phi=gathered[:, -2], has_phi=gathered[:, -1] > 0.5,
                          class_ids=class_ids)


def cluster_temperature(phi: torch.Tensor, has_phi: torch.Tensor, *, mode: str = "pcl", tau0: float = 0.1,
                        clip_percentiles: tuple[float, float] = (10.0, 90.0)) -> torch.Tensor:
    """Per-class temperature of the sampled classes from phi (identical on every rank).

    The phi-based modes of cluster.temperature_mode; its 'learnable' mode is `learnable_temperature`.

    raw (the paper's form): temperature = phi. pcl: phi clipped to its percentiles, then tau0 * phi / mean(phi),
    so the temperatures average tau0 whatever the scale of phi. Classes without a phi take the
    largest phi; when no class has one, every temperature is tau0 (pcl) or 1 (raw).
    """
    if mode not in PHI_TEMPERATURE_MODES:
        raise ValueError(f"temperature mode must be one of {PHI_TEMPERATURE_MODES}, got {mode!r}")
    if phi.numel() == 0 or not bool(has_phi.any()):
        return torch.full_like(phi, tau0 if mode == "pcl" else 1.0)
    filled = torch.where(has_phi, phi, phi[has_phi].max())
    if mode == "raw":
        return filled
    quantiles = torch.tensor([clip_percentiles[0] / 100.0, clip_percentiles[1] / 100.0],
                             dtype=filled.dtype, device=filled.device)
    low, high = torch.quantile(filled, quantiles)
    clipped = filled.clamp(low, high)
    return tau0 * clipped / clipped.mean()


def _local_block(sampled: SampledCenters, tensor: torch.Tensor) -> torch.Tensor:
    return tensor[sampled.offset: sampled.offset + len(sampled.local_indices)]


def cluster_contrastive_loss(features: torch.Tensor, global_labels: torch.Tensor, sampled: SampledCenters,
                             partition: ClassPartition, *, temperature: torch.Tensor,
                             group: ProcessGroup | None = None) -> torch.Tensor:
    """L_Clu-Con (Eq. 6): cross entropy of f_i . C_j / t_j over the sampled centers, positive C_{y_i}.

    features: (B_g, d) normalized global batch (with grad); temperature: (M_total,) from
    `cluster_temperature`. A row whose class was not sampled (no center) is ignored.
    """
    local_centers = _local_block(sampled, sampled.centers).to(features.dtype)
    local_temperature = _local_block(sampled, temperature).to(features.dtype)
    logits = features @ (local_centers / local_temperature.unsqueeze(1)).t()
    return sharded_cross_entropy(logits, positive_columns(global_labels, sampled, partition), group)


def positive_columns(global_labels: torch.Tensor, sampled: SampledCenters, partition: ClassPartition) -> torch.Tensor:
    """(B_g,) column of each row's own class among this rank's sampled centers, -1 when it is not there.

    A search in the sorted sampled classes: nothing of the shard's size is made (issue 25)."""
    local = sampled.local_indices
    rows = global_labels.to(local.device) - partition.start  # outside the shard (or -1, ignored): never found
    return position_in_sorted(local, rows)


def learnable_temperature(log_tau0: torch.Tensor, count: int, group: ProcessGroup | None) -> torch.Tensor:
    """(count,) the shared learnable temperature tau0 = exp(log_tau0) of every sampled class, for L_con.

    Like L_ali's tau: each rank's backward only sees its own columns, `sum_grad_across_ranks` makes
    every rank's log_tau0.grad the full gradient.
    """
    return torch.exp(sum_grad_across_ranks(log_tau0, group)).expand(count)


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return all_reduce_sum_(grad_output.clone(), ctx.group), None


def sum_grad_across_ranks(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Use a replicated parameter in a sharded loss so its gradient is the full sum on every rank."""
    if group_size(group) == 1:
        return tensor
    return _SumGradAcrossRanks.apply(tensor, group)


def cluster_aligning_loss(sampled: SampledCenters, weight: torch.Tensor, log_tau: torch.Tensor, *,
                          group: ProcessGroup | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """L_Clu-Ali (Eq. 7): cross entropy of C_i . W_j / tau over the sampled classes, positive W_i.

    weight: this rank's classifier shard (num_local, d) with grad; only the sampled rows are
    used, upcast after the gather (bfloat16 storage) and normalized. log_tau: the replicated learnable log temperature.
    rows: those rows already gathered, with grad (the margin head's shared block); None: gathered here.
    """
    if rows is None:
        rows = upcast(gather_rows(weight, sampled.local_indices))  # W's grad: these rows
    local_weight = F.normalize(rows, dim=1)
    inverse_tau = torch.exp(-sum_grad_across_ranks(log_tau, group))
    logits = (sampled.centers.to(local_weight.dtype) @ local_weight.t()) * inverse_tau
    positions = torch.arange(sampled.total, device=weight.device)
    local_count = len(sampled.local_indices)
    target = torch.where((positions >= sampled.offset) & (positions < sampled.offset + local_count),
                         positions - sampled.offset, torch.full_like(positions, -1))
    return sharded_cross_entropy(logits, target, group)

