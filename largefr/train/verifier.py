"""Verification beside the loop: the trainer hands it the model; what is measured, and how, lives here.

`Verifier(module)` -> accuracy of every verification set (data.val_targets: insightface .bin pairs or pairs
drawn from an identity folder), each rank embedding its share, the same result on every rank. A new measure
computed during training is a method here and a line in the trainer's `_record_verification`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import broadcast_buffers_
from largefr.eval.verification import embed_images_distributed, verification_accuracy


@dataclass(kw_only=True)
class VerificationSet:
    name: str
    local_images: torch.Tensor
    """This rank's share (`share_range`) of the 2N images, uint8 N x 3 x H x W; pairs are rows 2i, 2i+1."""
    issame: list[bool]


@dataclass(kw_only=True)
class Verifier:
    """The verification sets and how to score them (the eval section of the config)."""

    sets: list[VerificationSet]
    every: int = 0
    """Verify after every `every` optimizer steps (eval.every; 0: never during the run)."""
    batch_size: int = 64
    """Images per forward, per rank (eval.batch_size)."""
    folds: int = 10
    flip: bool = True
    """Add the horizontally flipped image's embedding (eval.flip)."""
    embedding_size: int = 512
    device: torch.device | None = None
    group: ProcessGroup | None = None

    def due(self, steps_done: int) -> bool:
        """Whether verification runs after `steps_done` optimizer steps."""
        return self.every > 0 and steps_done % self.every == 0

    def __call__(self, module: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        """Accuracy of every set for `module` (collective: every rank of the group calls it).

        Each rank's BatchNorm running statistics follow its own batches (the engine does not sync
        buffers), and a checkpoint keeps rank 0's: every rank takes rank 0's first, so the accuracy is
        that of the model the checkpoint holds, whatever the number of ranks.
        """
        broadcast_buffers_(module, self.group)
        accuracies = {}
        for target in self.sets:
            embeddings = embed_images_distributed(
                module, target.local_images, batch_size=self.batch_size, flip=self.flip,
                embedding_size=self.embedding_size, device=self.device, dtype=dtype, group=self.group)
            accuracies[target.name] = verification_accuracy(embeddings, target.issame, num_folds=self.folds).accuracy
        return accuracies
