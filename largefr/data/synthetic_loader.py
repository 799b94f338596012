"""In-memory synthetic batches for benchmarks: no file reading, no decode cost."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from largefr.data.sharding import EpochLoader


class SyntheticLoader(EpochLoader):
    """Fixed random images (float32 Bx3xHxW in [-1, 1]) with fresh random labels in [0, num_classes).

    The images are made once on `device` and reused (as insightface's synthetic loader does); the
    labels change every batch so that Partial FC sampling and the class-partitioned head see a
    realistic spread of classes. Deterministic given (seed, rank, epoch).
    """

    def __init__(self, *, batch_size: int, num_classes: int, rank: int = 0, num_batches: int = 100, seed: int = 0,
                 image_size: int = 112, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if batch_size < 1 or num_classes < 1 or num_batches < 1:
            raise ValueError(f"batch_size, num_classes and num_batches must be >= 1, got {batch_size}, "
                             f"{num_classes}, {num_batches}")
        self.batch_size, self.num_classes, self.rank, self.seed = batch_size, num_classes, rank, seed
        self.num_batches = num_batches
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        images = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
        self.images = images.to(self.device)
        self.skipped_images = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._take_skip()
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 10_007 + self.epoch)
        labels = torch.randint(0, self.num_classes, (self.num_batches, self.batch_size), generator=generator)
        labels = labels.to(self.device)
        for batch in range(start, self.num_batches):
            yield self.images, labels[batch]
