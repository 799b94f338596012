"""A config's training data outside a training run: its loader in one process, and a preview grid.

Used by tools/preview_augment.py (look at data.augment before training) and tools/bench_loader.py
(loader throughput with augmentation on and off). Both prepare the data as training does
(`largefr.data.prepare.prepare_data` in one CPU process: the synthetic quickstart set generated,
data.images packed) and open the loader training opens (`PreparedData.open_loader`), on the CPU.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from largefr.config import AugmentConfig, Config
from largefr.data.prepare import PreparedData
from largefr.data.sharding import EpochLoader


def config_loader(prepared: PreparedData, *, augment: AugmentConfig | None, kind: str | None = None,
                  batch_size: int | None = None, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                  random_flip: bool | None = None) -> EpochLoader:
    """The training loader of the prepared data on the CPU, with `augment` instead of data.augment."""
    data = prepared.config.data
    return prepared.open_loader(kind=kind or data.loader, batch_size=batch_size or prepared.config.train.batch_size,
                                rank=rank, world_size=world_size, local_rank=0, shuffle=shuffle,
                                random_flip=data.random_flip if random_flip is None else random_flip,
                                device="cpu", augment=augment)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x H x W x 3 uint8 of a loader batch ((x - 127.5) / 127.5, B x 3 x H x W)."""
    return torch.round(images * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def preview_rows(prepared: PreparedData, *, augment: AugmentConfig, rows: int, columns: int,
                 kind: str | None = None) -> list[np.ndarray]:
    """2 * `rows` rows of `columns` images: the first images of `rows` spread-out shards of the data,
    each as stored (no flip) and then as training sees it with `augment` (file order, so they pair up)."""
    out = []
    for shard in range(rows):
        pair = []
        for row_augment, flip in ((None, False), (augment, None)):
            loader = config_loader(prepared, augment=row_augment, kind=kind, batch_size=columns, rank=shard,
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
