"""Data: insightface RecordIO and .bin formats, and the loaders (DALI, torch fallback, synthetic).

Every loader yields per rank `(images float32 Bx3xHxW, RGB, (x - 127.5) / 127.5; labels int64 B)`
and supports `len()` (batches per epoch, equal on all ranks), `set_epoch(e)`, `skip(k)` /
`iter_from(k)` (resume at batch k of the epoch) and `skipped_images`. `open_loader(LoaderSettings)`
opens one (`build_loader(kind, **settings)` is the same with keywords); a run's loader settings come
from `largefr.data.prepare.PreparedData.loader_settings`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from largefr.choices import BAD_IMAGE_POLICIES, LOADER_KINDS
from largefr.data.image_index import ImageIndex, prepare_image_index
from largefr.data.rec_set import resolve_rec_set
from largefr.data.recordio import BadImageError, RecordIOError
from largefr.data.sharding import EpochLoader
from largefr.errors import UsageError

if TYPE_CHECKING:  # torch is imported lazily: tools such as pack_rec.py start faster without it
    import torch

    from largefr.config import AugmentConfig

__all__ = ["BadImageError", "EpochLoader", "ImageIndex", "LoaderSettings", "RecordIOError", "build_loader",
           "open_loader", "prepare_image_index"]


def _default_device(local_rank: int) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _check_image_size(rec: str | Sequence[str], image_size: int) -> None:
    rec_set = resolve_rec_set(rec)
    prop = rec_set.property()
    if prop is None:
        return
    _, height, width, _ = prop
    if (height, width) != (image_size, image_size):
        where = os.path.join(rec_set.property_dirs[0], "property")
        raise RecordIOError(f"{where}: images are {height}x{width} but the loader was asked "
                            f"for {image_size}x{image_size}; set data.image_size={height} or re-pack the data")


@dataclass(frozen=True, kw_only=True)
class LoaderSettings:
    """Everything one rank's loader needs (`open_loader`); `largefr.data.prepare.PreparedData.loader_settings`
    fills it from the config."""

    kind: str
    """data.loader: 'dali', 'torch' or 'synthetic' (LOADER_KINDS)."""
    rec: str | Sequence[str] | None
    """data.rec: a folder holding train.rec, train.idx and property, a folder of shards (train-00000.rec ...), a
    .rec file, or a list of these (largefr/data/rec_set.py); None for the synthetic loader."""
    batch_size: int
    rank: int
    world_size: int
    num_classes: int
    local_rank: int = 0
    seed: int = 0
    image_size: int = 112
    num_workers: int = 2
    """DataLoader workers (torch) or DALI threads."""
    shuffle: bool = True
    random_flip: bool = True
    shuffle_buffer: int = 10000
    on_bad_image: str = "error"
    drop_last: bool = True
    num_images: int | None = None
    """Sizes only the synthetic loader's epoch (default 100 batches)."""
    cache_dir: str | None = None
    """Where the scanned image index goes when `rec` is read-only (default: $LARGEFR_CACHE or ~/.cache/largefr)."""
    device: "str | torch.device | None" = None
    """Where the DALI and synthetic loaders put batches (default cuda:local_rank when CUDA is available, else
    cpu); the torch loader yields CPU batches, in pinned memory when `device` is a GPU (its host-to-device copies
    are then asynchronous)."""
    augment: "AugmentConfig | None" = None
    """data.augment, applied by the DALI and torch loaders (largefr/data/augment.py); the synthetic loader's
    random tensors are not augmented."""


def build_loader(kind: str, **settings: Any) -> EpochLoader:
    """The loader of `kind` for this rank: `open_loader(LoaderSettings(kind=kind, **settings))`."""
    return open_loader(LoaderSettings(kind=kind, **settings))


def open_loader(settings: LoaderSettings) -> EpochLoader:
    """The loader `settings` describe ('dali', 'torch' or 'synthetic'), checked against the data's property file."""
    s = settings
    kind, rec, on_bad_image = s.kind, s.rec, s.on_bad_image
    if kind not in LOADER_KINDS:
        raise ValueError(f"data.loader={kind!r} is not one of {LOADER_KINDS}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image={on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
    if kind == "synthetic":
        from largefr.data.synthetic_loader import SyntheticLoader

        num_batches = 100 if s.num_images is None else max(1, s.num_images // (s.world_size * s.batch_size))
        return SyntheticLoader(batch_size=s.batch_size, num_classes=s.num_classes, rank=s.rank, num_batches=num_batches,
                               seed=s.seed, image_size=s.image_size, device=s.device or _default_device(s.local_rank))
    if not rec:
        raise UsageError(f"data.loader={kind} needs data.rec, the folder holding train.rec, train.idx and property "
                         "(or shards)")
    _check_image_size(rec, s.image_size)
    index = prepare_image_index(rec, num_classes=s.num_classes, on_bad_image=on_bad_image, cache_dir=s.cache_dir)
    common = dict(batch_size=s.batch_size, rank=s.rank, world_size=s.world_size, seed=s.seed, image_size=s.image_size,
                  shuffle=s.shuffle, random_flip=s.random_flip, on_bad_image=on_bad_image, drop_last=s.drop_last,
                  augment=s.augment)
    if kind == "torch":
        import torch

        from largefr.data.torch_loader import TorchRecLoader

        pin_memory = torch.device(s.device or _default_device(s.local_rank)).type == "cuda"
        return TorchRecLoader(index, num_workers=s.num_workers, pin_memory=pin_memory, **common)
    from largefr.data.dali_loader import DaliRecLoader

    return DaliRecLoader(index, local_rank=s.local_rank, num_threads=max(1, s.num_workers),
                         shuffle_buffer=s.shuffle_buffer, device=s.device, **common)
