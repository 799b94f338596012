"""Plain torch DataLoader over insightface .rec files: the fallback where DALI is not installed.

Reads one .rec or a set of shards (one global image order, largefr/data/rec_set.py) through the same
validated image index as the DALI loader and shards it the same way
(largefr.data.sharding), decodes with PIL (libjpeg-turbo, like DALI's CPU decoder: pixels are
identical) and normalizes as DALI's crop_mirror_normalize does, so with shuffle and flip off both
loaders yield the same batches. data.augment runs per image between decode and normalize
(largefr/data/augment_torch.py), seeded per image from (seed, epoch, rank, position in the epoch).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from largefr.config import AugmentConfig
from largefr.data.augment_torch import augment_image
from largefr.data.image_index import ImageIndex
from largefr.data.recordio import BadImageError, RecordFile, RecordIOError
from largefr.data.sharding import EpochLoader, check_enough_samples, shard_positions, shard_range

logger = logging.getLogger(__name__)

# (position in the image index, flip, shard start, shard end, augmentation seed): the shard bounds let a
# skipped image be replaced by the next decodable one of the same shard; the seed draws the image's
# data.augment operators (the same seed on a resume, so the same augmentations).
SampleRequest = tuple[int, bool, int, int, int]


def normalize_image(hwc_uint8: np.ndarray, flip: bool) -> torch.Tensor:
    """3 x H x W float32 of an RGB uint8 image: mirrored if `flip`, then (x - 127.5) / 127.5.

    Computed as (x - 127.5) * float32(1 / 127.5), exactly as DALI's crop_mirror_normalize does, so
    both loaders give bit-identical tensors.
    """
    if flip:
        hwc_uint8 = hwc_uint8[:, ::-1]
    chw = torch.from_numpy(np.ascontiguousarray(hwc_uint8)).permute(2, 0, 1).float()
    return chw.sub_(127.5).mul_(1 / 127.5)


def decode_rgb(data: bytes) -> np.ndarray:
    """H x W x 3 uint8 RGB of an encoded image (any format PIL reads)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


class RecordImageDataset(Dataset):
    """Decoded, normalized images of a .rec, addressed by SampleRequest."""

    def __init__(self, index: ImageIndex, *, image_size: int, on_bad_image: str,
                 augment: AugmentConfig | None = None) -> None:
        self.index = index
        self.augment = augment if augment is not None and augment.enabled else None
        self.image_size = image_size
        self.on_bad_image = on_bad_image
        self.files = [RecordFile(path) for path in index.rec_paths]
        """One lazily opened reader per .rec of the set (each DataLoader worker opens its own descriptors)."""

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, position: int) -> tuple[np.ndarray, int]:
        number = self.index.file_of(position)
        key, offset = int(self.index.keys[position]), int(self.index.offsets[position])
        _, data = self.files[number].read_sample_at(offset, key)
        path = self.index.rec_paths[number]
        try:
            image = decode_rgb(data)
        except Exception as err:
            raise BadImageError(f"{path} key {key} (offset {offset}): undecodable image "
                                f"({type(err).__name__}: {err}); set data.on_bad_image=skip to skip it") from None
        if image.shape[:2] != (self.image_size, self.image_size):
            raise RecordIOError(f"{path} key {key}: image is {image.shape[1]}x{image.shape[0]}, "
                                f"expected {self.image_size}x{self.image_size} (data.image_size / property)")
        return image, int(self.index.labels[position])

    def __getitem__(self, request: SampleRequest) -> tuple[torch.Tensor, int, int]:
        position, flip, start, end, augment_seed = request
        for skipped in range(end - start):
            try:
                image, label = self._load(start + (position - start + skipped) % (end - start))
                if self.augment is not None:
                    image = augment_image(image, self.augment, np.random.default_rng(augment_seed))
                return normalize_image(image, flip), label, skipped
            except BadImageError as err:
                if self.on_bad_image != "skip":
                    raise
                logger.warning("skipping: %s", err)
        raise RecordIOError(f"{self.index.rec_path}: no decodable image in shard positions [{start}, {end})")


def _collate(samples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels, sum(s[2] for s in samples)


class EpochBatches:
    """The batches of SampleRequests of one rank's epoch, made one batch at a time from numpy arrays (an
    epoch of a 42M-image set is millions of requests: never held as Python objects at once).

    Iterating yields the non-empty batches from batch `first` on (a DataLoader batch_sampler)."""

    def __init__(self, positions: np.ndarray, flips: np.ndarray, seeds: np.ndarray, start: int, end: int,
                 batch_size: int, num_batches: int) -> None:
        self.positions, self.flips, self.seeds = positions, flips, seeds
        self.start, self.end, self.batch_size, self.num_batches = start, end, batch_size, num_batches
        self.first = 0

    def batch(self, number: int) -> list[SampleRequest]:
        part = slice(number * self.batch_size, (number + 1) * self.batch_size)
        return [(int(p), bool(f), self.start, self.end, int(s))
                for p, f, s in zip(self.positions[part], self.flips[part], self.seeds[part])]

    @property
    def has_empty_last(self) -> bool:
        """drop_last=False can leave this rank's last batch empty (sharding.py)."""
        return self.num_batches > self.first and (self.num_batches - 1) * self.batch_size >= len(self.positions)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.first - int(self.has_empty_last))

    def __iter__(self) -> Iterator[list[SampleRequest]]:
        for number in range(self.first, self.num_batches - int(self.has_empty_last)):
            yield self.batch(number)


class TorchRecLoader(EpochLoader):
    """Per-rank batches `(images float32 Bx3xHxW, labels int64 B)` from a DataLoader."""

    def __init__(self, index: ImageIndex, *, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 image_size: int = 112, num_workers: int = 2, shuffle: bool = True, random_flip: bool = True,
                 on_bad_image: str = "error", drop_last: bool = True, pin_memory: bool = False,
                 augment: AugmentConfig | None = None) -> None:
        super().__init__()
        self.pin_memory = pin_memory
        """Batches in page-locked memory, so the trainer's non_blocking copies to a GPU overlap (CUDA runs)."""
        self.index, self.batch_size, self.rank, self.world_size = index, batch_size, rank, world_size
        self.seed, self.image_size, self.num_workers = seed, image_size, num_workers
        self.shuffle, self.random_flip, self.drop_last = shuffle, random_flip, drop_last
        self.num_batches = check_enough_samples(len(index), world_size, batch_size, drop_last, index.rec_path)
        self.dataset = RecordImageDataset(index, image_size=image_size, on_bad_image=on_bad_image, augment=augment)
        self.skipped_images = 0
        """Images replaced because they could not be decoded (on_bad_image='skip'), all epochs."""

    def epoch_batches(self, epoch: int) -> "EpochBatches":
        """The sample requests of every batch this rank yields in `epoch` (built batch by batch)."""
        positions = shard_positions(len(self.index), self.world_size, self.rank, epoch,
                                    shuffle=self.shuffle, seed=self.seed)
        start, end = shard_range(len(self.index), self.world_size, (self.rank + epoch) % self.world_size)
        flips = np.zeros(len(positions), dtype=bool)
        if self.random_flip:
            flips = np.random.default_rng([self.seed, epoch, self.rank, 1]).random(len(positions)) < 0.5
        seeds = np.random.SeedSequence([self.seed, epoch, self.rank, 2]).generate_state(len(positions), np.uint64)
        return EpochBatches(positions, flips, seeds, start, end, self.batch_size, self.num_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.epoch_batches(self.epoch)
        batches.first = self._take_skip()
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=self.pin_memory)
        for images, labels, skipped in loader:
            self.skipped_images += skipped
            yield images, labels
        if batches.has_empty_last:  # drop_last=False: this rank's last batch is empty (see sharding)
            yield torch.empty(0, 3, self.image_size, self.image_size), torch.empty(0, dtype=torch.int64)
