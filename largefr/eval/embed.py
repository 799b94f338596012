"""Embeddings of a folder of aligned face images (112 x 112 crops, as in insightface's data).

Images are found recursively (.jpg .jpeg .png .bmp .webp), sorted by relative path; that order
is the row order of the result. When every image sits in a subfolder, the first path component is
taken as its identity (`DIR/<identity>/<image>`), which gives labels for clustering evaluation.
Input to the network: RGB, (x - 127.5) / 127.5, N x 3 x 112 x 112, as in training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from largefr.eval.verification import embed_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderError(ValueError):
    """A folder without images, or an image that is unreadable or not an aligned crop."""


@dataclass(kw_only=True)
class FolderEmbeddings:
    names: list[str]
    """Relative paths, row order."""
    embeddings: np.ndarray
    """N x d float32."""
    labels: np.ndarray | None
    """Identity index per image (from the first subfolder), or None when images are not in subfolders."""
    identities: list[str] | None
    """Subfolder name of each identity index."""


def list_images(folder: str) -> list[str]:
    """Relative paths of the images under `folder`, sorted."""
    if not os.path.isdir(folder):
        raise ImageFolderError(f"--images {folder}: no such directory")
    found = []
    for parent, directories, files in os.walk(folder):
        directories.sort()
        found.extend(os.path.relpath(os.path.join(parent, name), folder) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ImageFolderError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return sorted(found)


def read_aligned(path: str, image_size: int) -> np.ndarray:
    """H x W x 3 uint8 RGB of an aligned crop; refuses other sizes (resizing an unaligned photo misleads)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ImageFolderError(f"{path}: unreadable image ({error})") from None
    if pixels.shape[:2] != (image_size, image_size):
        raise ImageFolderError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, expected an aligned "
                               f"{image_size}x{image_size} face crop (align it first, e.g. with largefr.eval.align)")
    return pixels


def labels_from_subfolders(names: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """(identity index per name, identity names) from the first path component; None if some image is top-level."""
    parts = [name.split(os.sep, 1) for name in names]
    if any(len(p) < 2 for p in parts):
        return None, None
    identities, labels = np.unique([p[0] for p in parts], return_inverse=True)
    return labels.reshape(-1).astype(np.int64), identities.tolist()


def embed_folder(model: nn.Module, folder: str, *, batch_size: int, device: torch.device | str = "cpu",
                 flip: bool = False, normalize: bool = True, image_size: int = 112) -> FolderEmbeddings:
    """Embeddings of every image under `folder` (flip-sum with `flip`; L2-normalized with `normalize`)."""
    names = list_images(folder)
    chunk = 8 * batch_size  # decoded at a time
    parts = []
    for start in range(0, len(names), chunk):
        pixels = np.stack([read_aligned(os.path.join(folder, n), image_size) for n in names[start:start + chunk]])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
        parts.append(embed_images(model, tensor, batch_size=batch_size, flip=flip, device=device).cpu())
    embeddings = torch.cat(parts)
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    labels, identities = labels_from_subfolders(names)
    return FolderEmbeddings(names=names, embeddings=embeddings.numpy().astype(np.float32), labels=labels,
                            identities=identities)
