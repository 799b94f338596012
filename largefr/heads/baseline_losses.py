"""The paper's Table 3 baselines in place of L_con: Center loss and a triplet loss, sharded by class.

Both compare the global batch's normalized features F (replicated on every rank, with grad) with
normalized cluster-bank centers (detached), as L_con does; only the loss form changes
(`cluster.contrastive_type`, where the choices are argued).

- Center loss (Wen et al. 2016): L = 1/(2N) sum_i ||f_i - C_{y_i}||^2 over the N rows whose class
  has a center, C from the bank. The rank owning y_i computes row i's term.
- Triplet loss (Schroff et al. 2015) with batch-hard negatives (Hermans et al. 2017): positive =
  C_{y_i} among the M sampled centers, negative C_n = the sampled center of another class nearest
  to f_i over all ranks (nearest = most similar: all are unit vectors);
  L = mean_i max(0, ||f_i - C_{y_i}||^2 - ||f_i - C_n||^2 + margin) over the rows that have both.
  The rank holding the positive computes its distance, the rank holding the nearest negative
  (lowest rank on a tie) computes that one.

Sharding: each rank sums the terms it owns into a partial loss; `sum_partials_across_ranks` makes
the total identical on every rank while each rank's backward keeps its own part, and
`all_gather_with_grad`'s backward sums the ranks' feature gradients into the exact one. Rows that
count nowhere are ignored; when no row counts the loss is 0 with a zero gradient.
Communication per step: Center loss one all-reduce of two numbers; triplet one all-gather of
B_g distances (the negative's rank), one all-reduce of 4 x B_g values, one of one number.
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_gather_rows, all_reduce_sum_, group_rank, sum_partials_across_ranks
from largefr.distributed.partition import ClassPartition
from largefr.heads.cluster import ClusterBank
from largefr.heads.cluster_losses import SampledCenters, positive_columns


def center_loss(features: torch.Tensor, global_labels: torch.Tensor, bank: ClusterBank, *,
                group: ProcessGroup | None = None) -> torch.Tensor:
    """Center loss of the normalized global batch `features` (B_g, d) against the bank's class centers."""
    part = bank.partition
    labels = global_labels.to(bank.seen.device)
    rows = torch.nonzero((labels >= part.start) & (labels < part.end)).squeeze(1)
    rows = rows[bank.seen[labels[rows] - part.start]]  # a class without a center: row ignored
    centers = bank.centers[labels[rows] - part.start].to(features.dtype)
    squared = (features[rows.to(features.device)] - centers).pow(2).sum()
    count = torch.tensor(float(rows.numel()), dtype=features.dtype, device=features.device)
    total = sum_partials_across_ranks(torch.stack([squared, count]), group)
    return total[0] / (2.0 * total[1].clamp(min=1.0))


def _nearest_negatives(features: torch.Tensor, local_centers: torch.Tensor, target: torch.Tensor,
                       group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: this rank's nearest non-positive sampled center (local column) and whether it is the global one.

    One all-gather of every rank's best squared distance (+inf when a rank has no candidate); the
    lowest rank wins a tie, so exactly one rank holds each row's negative.
    """
    with torch.no_grad():
        distances = (features.pow(2).sum(1, keepdim=True) + local_centers.pow(2).sum(1)
                     - 2.0 * features @ local_centers.t())
        rows = torch.nonzero(target >= 0).squeeze(1)
        distances[rows, target[rows]] = float("inf")  # the own class is no negative
        if local_centers.shape[0] > 0:
            best, column = distances.min(dim=1)
        else:
            best = torch.full((features.shape[0],), float("inf"), dtype=features.dtype, device=features.device)
            column = torch.zeros(features.shape[0], dtype=torch.int64, device=features.device)
        every_rank = all_gather_rows(best.unsqueeze(0), group)  # (world, B_g)
        winner = every_rank.argmin(dim=0)
        mine = (winner == group_rank(group)) & torch.isfinite(every_rank.min(dim=0).values)
    return column, mine


def triplet_loss(features: torch.Tensor, global_labels: torch.Tensor, sampled: SampledCenters,
                 partition: ClassPartition, *, margin: float, group: ProcessGroup | None = None) -> torch.Tensor:
    """Batch-hard triplet loss of the normalized global batch `features` (B_g, d) against the sampled centers."""
    start = sampled.offset
    local_centers = sampled.centers[start: start + len(sampled.local_indices)].to(features.dtype)
    target = positive_columns(global_labels, sampled, partition).to(features.device)
    negative_column, has_negative_here = _nearest_negatives(features, local_centers, target, group)
    has_positive_here = target >= 0
    positive = _masked_squared_distance(features, local_centers, target.clamp(min=0), has_positive_here)
    negative = _masked_squared_distance(features, local_centers, negative_column, has_negative_here)
    with torch.no_grad():  # every row's two distances and flags, identical on every rank
        summed = all_reduce_sum_(torch.stack([positive, negative, has_positive_here.to(features.dtype),
                                              has_negative_here.to(features.dtype)]).detach().clone(), group)
        counted = (summed[2] > 0.5) & (summed[3] > 0.5)
        active = counted & (summed[0] - summed[1] + margin > 0)
    partial = (positive - negative)[active].sum()
    total = sum_partials_across_ranks(partial, group) + margin * active.sum().to(features.dtype)
    return total / counted.sum().clamp(min=1).to(features.dtype)


def _masked_squared_distance(features: torch.Tensor, centers: torch.Tensor, column: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """(B_g,) ||f_i - centers[column_i]||^2 where mask, else 0 (with grad to the features)."""
    if centers.shape[0] == 0:
        return features.sum(1) * 0.0
    squared = (features - centers[column]).pow(2).sum(1)
    return torch.where(mask, squared, torch.zeros_like(squared))
