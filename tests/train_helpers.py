"""Small real parts for the trainer tests: a sharded ArcFace head, a tiny backbone, a dense reference.

The sharded head here is deliberately plain (full softmax, no Partial FC, no cluster terms) so
the dense float64 reference below can be written in a few obvious lines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from largefr.distributed.collectives import all_gather_rows, all_gather_with_grad, group_rank, group_size
from largefr.distributed.cross_entropy import sharded_cross_entropy
from largefr.distributed.partition import ClassPartition
from largefr.heads.joint import HeadLoss

IN_DIM, EMB_DIM = 10, 6


def tiny_backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, EMB_DIM))


def full_weight(num_classes: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, EMB_DIM, generator=generator)


def arcface_logits(cos: torch.Tensor, positive: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """cos: (rows, cols); positive: bool mask of the target entries."""
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return scale * torch.where(positive, torch.cos(theta + margin), cos)


class ShardedArcFace(torch.nn.Module):
    """This rank's rows of W; loss = sharded CE of ArcFace logits over the all-gathered batch."""

    def __init__(self, weight_full: torch.Tensor, *, scale: float = 16.0, margin: float = 0.3, group=None):
        super().__init__()
        self.group = group
        self.partition = ClassPartition(weight_full.shape[0], group_size(group), group_rank(group))
        rows = weight_full[self.partition.start:self.partition.end].clone()
        self.weight = torch.nn.Parameter(rows)
        self.scale, self.margin = scale, margin

    def forward(self, local_embeddings, local_labels, local_momentum_features=None):
        features = F.normalize(all_gather_with_grad(local_embeddings, self.group), dim=1)
        labels = all_gather_rows(local_labels, self.group)
        cos = features @ F.normalize(self.weight, dim=1).t()
        local_target = torch.where((labels >= self.partition.start) & (labels < self.partition.end),
                                   labels - self.partition.start, torch.full_like(labels, -1))
        positive = torch.zeros_like(cos, dtype=torch.bool)
        rows = torch.nonzero(local_target >= 0).squeeze(1)
        positive[rows, local_target[rows]] = True
        loss = sharded_cross_entropy(arcface_logits(cos, positive, self.scale, self.margin), local_target, self.group)
        return loss, {"arcface": loss}

    def training_loss(self, local_embeddings, local_labels, local_momentum_features=None) -> HeadLoss:
        """The `StepHead` contract: every row gets a gradient (no sampling), so no rows are named."""
        loss, terms = self(local_embeddings, local_labels, local_momentum_features)
        return HeadLoss(loss=loss, terms=terms, rows=None)

    def undo_last_update(self) -> None:
        """No state besides W: nothing to undo."""

    def set_step(self, step: int) -> None:
        """No warm-up: the loss does not depend on the step."""


class PoisonedHead:
    """A `StepHead` whose loss is NaN on the calls (1-based) `poisoned(call)` picks: non-finite steps for tests."""

    def __init__(self, head, poisoned):
        self.head, self.poisoned, self.calls = head, poisoned, 0

    def training_loss(self, local_embeddings, local_labels, local_momentum_features=None) -> HeadLoss:
        self.calls += 1
        out = self.head.training_loss(local_embeddings, local_labels, local_momentum_features)
        if not self.poisoned(self.calls):
            return out
        return HeadLoss(loss=out.loss * float("nan"), terms=out.terms, rows=out.rows)

    def undo_last_update(self) -> None:
        self.head.undo_last_update()

    def set_step(self, step: int) -> None:
        self.head.set_step(step)


def dense_reference(backbone: torch.nn.Module, weight_full: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor, *, scale: float = 16.0, margin: float = 0.3):
    """float64 gradients (backbone params by name, W) of mean ArcFace CE over the whole global batch."""
    model = backbone.double()
    weight = weight_full.double().clone().requires_grad_(True)
    features = F.normalize(model(images.double()), dim=1)
    cos = features @ F.normalize(weight, dim=1).t()
    positive = F.one_hot(labels, weight.shape[0]).bool()
    loss = F.cross_entropy(arcface_logits(cos, positive, scale, margin), labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, weight.grad.to_dense()


def rank_batch(rank: int, batch: int, num_classes: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-rank batch (the dense reference concatenates ranks in order)."""
    generator = torch.Generator().manual_seed(seed + 1000 * rank)
    images = torch.randn(batch, IN_DIM, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return images, labels
