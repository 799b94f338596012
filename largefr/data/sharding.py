"""Which image positions a rank reads in an epoch: one arithmetic for the DALI and torch loaders.

Positions index the validated image keys in file order. Shards are DALI's: shard s of n over N
samples is `[N*s//n, N*(s+1)//n)` (sizes differ by at most one). In epoch e rank r reads shard
`(r + e) % world`, so over `world` epochs every rank sees every identity even though an
identity-sorted .rec puts each identity in one shard. Every rank yields the same number of batches
(a rank stepping alone would hang the collectives):
- drop_last=True: `(N // world) // batch` full batches (the smallest shard decides); the remainder of
  each shard (fewer than batch + 1 samples) is not read that epoch, another part of it the next.
- drop_last=False: `ceil(ceil(N / world) / batch)` batches; a rank's last batch holds only its own
  remaining samples (possibly none) - for evaluation passes, not for training.
"""
from __future__ import annotations

import math

import numpy as np

from largefr.errors import UsageError


def shard_range(num_samples: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """[start, end) of shard `shard_id`, as DALI's readers split `num_samples`."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def epoch_shard_id(rank: int, world_size: int, epoch: int) -> int:
    return (rank + epoch) % world_size


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return (num_samples // world_size) // batch_size
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def shard_positions(num_samples: int, world_size: int, rank: int, epoch: int, *,
                    shuffle: bool, seed: int) -> np.ndarray:
    """Positions rank `rank` reads in `epoch`, in reading order (a seeded permutation if shuffle)."""
    shard_id = epoch_shard_id(rank, world_size, epoch)
    start, end = shard_range(num_samples, world_size, shard_id)
    positions = np.arange(start, end, dtype=np.int64)
    if shuffle:
        positions = np.random.default_rng([seed, epoch, shard_id]).permutation(positions)
    return positions


def check_enough_samples(num_samples: int, world_size: int, batch_size: int, drop_last: bool, source: str) -> int:
    """batches_per_epoch, or an error when a rank would get no batch at all."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    num_batches = batches_per_epoch(num_samples, world_size, batch_size, drop_last)
    if num_batches == 0:
        raise UsageError(f"{source}: {num_samples} images give each of {world_size} ranks a shard of "
                         f"{num_samples // world_size}, smaller than one batch of {batch_size}; use a smaller "
                         "batch size, fewer ranks or more data")
    return num_batches


class EpochLoader:
    """Epoch and resume bookkeeping shared by the loaders.

    `set_epoch(e)` picks the epoch the next iteration yields (as DistributedSampler: call it every
    epoch); `skip(k)` makes the next iteration start at batch k of that epoch (resume mid-epoch);
    `iter_from(k)` does both steps of a resume at once. `len()` is the number of batches per epoch
    per rank, equal on every rank.
    """

    num_batches: int = 0

    def __init__(self) -> None:
        self.epoch = 0
        self._skip_batches = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def skip(self, num_batches: int) -> None:
        if not 0 <= num_batches <= self.num_batches:
            raise ValueError(f"cannot skip {num_batches} batches of an epoch of {self.num_batches}")
        self._skip_batches = num_batches

    def iter_from(self, num_batches: int):
        self.skip(num_batches)
        return iter(self)

    def _take_skip(self) -> int:
        skip, self._skip_batches = self._skip_batches, 0
        return skip
