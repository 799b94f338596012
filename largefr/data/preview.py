"""A config's training data outside a training run: its loader in one process, and a preview grid.

Used by tools/preview_augment.py (look at data.augment before training) and tools/bench_loader.py
(loader throughput with augmentation on and off). The data folder is prepared as training does
(the synthetic quickstart set generated, data.images packed) and the loader is the one training
builds (largefr.train.build.build_train_loader's arguments), on the CPU.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from largefr.config import AugmentConfig, Config
from largefr.data import EpochLoader, build_loader


def prepare_config_data(config: Config) -> tuple[Config, str | None]:
    """(config with data.num_classes / num_images filled from the data, data folder), single process."""
    from largefr.train.build import prepare_data_dir, with_data_counts
    from largefr.train.distributed_env import DistributedEnv

    env = DistributedEnv(rank=0, world_size=1, local_rank=0, launcher="single", backend="gloo",
                         device=torch.device("cpu"))
    folder = prepare_data_dir(config, env)
    return with_data_counts(config, folder, env), folder


def config_loader(config: Config, folder: str | None, *, augment: AugmentConfig | None, kind: str | None = None,
                  batch_size: int | None = None, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                  random_flip: bool | None = None) -> EpochLoader:
    """The training loader of `config` on the CPU, with `augment` instead of data.augment."""
    data = config.data
    return build_loader(kind or data.loader, rec=folder, batch_size=batch_size or config.train.batch_size, rank=rank,
                        world_size=world_size, num_classes=data.num_classes, seed=config.train.seed,
                        image_size=data.image_size, num_workers=data.num_workers, shuffle=shuffle,
                        random_flip=data.random_flip if random_flip is None else random_flip,
                        shuffle_buffer=data.shuffle_buffer, on_bad_image=data.on_bad_image, drop_last=True,
                        num_images=data.num_images, cache_dir=data.cache_dir, device="cpu", augment=augment)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x H x W x 3 uint8 of a loader batch ((x - 127.5) / 127.5, B x 3 x H x W)."""
    return torch.round(images * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def preview_rows(config: Config, folder: str | None, *, augment: AugmentConfig, rows: int, columns: int,
                 kind: str | None = None) -> list[np.ndarray]:
    """2 * `rows` rows of `columns` images: the first images of `rows` spread-out shards of the data,
    each as stored (no flip) and then as training sees it with `augment` (file order, so they pair up)."""
    out = []
    for shard in range(rows):
        pair = []
        for row_augment, flip in ((None, False), (augment, None)):
            loader = config_loader(config, folder, augment=row_augment, kind=kind, batch_size=columns, rank=shard,
                                   world_size=rows, shuffle=False, random_flip=flip)
            images, _ = next(iter(loader))
            pair.append(to_uint8(images))
        out.extend(pair)
    return out


def grid_image(rows: list[np.ndarray], *, zoom: int = 1, gap: int = 2) -> np.ndarray:
    """One H x W x 3 uint8 picture of rows of equal-sized images, `gap` white pixels apart, each `zoom`x."""
    height, width = rows[0].shape[1] * zoom, rows[0].shape[2] * zoom
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = gap + r * (height + gap), gap + c * (width + gap)
            canvas[top:top + height, left:left + width] = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return canvas


ROW_LABEL_WIDTH = 64
"""Pixels of the left margin that names each row of the preview."""


def with_row_labels(canvas: np.ndarray, labels: list[str], *, row_height: int, gap: int = 2) -> np.ndarray:
    """`canvas` with a white left margin naming each row (labels[r] beside row r), in PIL's default font."""
    from PIL import Image, ImageDraw

    margin = np.full((canvas.shape[0], ROW_LABEL_WIDTH, 3), 255, np.uint8)
    picture = Image.fromarray(np.concatenate([margin, canvas], axis=1))
    draw = ImageDraw.Draw(picture)
    for r, label in enumerate(labels):
        draw.text((4, gap + r * (row_height + gap) + row_height // 2 - 5), label, fill=(0, 0, 0))
    return np.asarray(picture)


def augment_of(config: Config, preset: str) -> AugmentConfig:
    """'config': data.augment; 'arcface_torch': augment.ARCFACE_TORCH_LIKE (the config's other fields kept)."""
    from largefr.data.augment import ARCFACE_TORCH_LIKE

    if preset == "config":
        return config.data.augment
    if preset == "arcface_torch":
        return dataclasses.replace(config.data.augment, **ARCFACE_TORCH_LIKE)
    raise ValueError(f"augmentation {preset!r} is not one of 'config', 'arcface_torch'")
