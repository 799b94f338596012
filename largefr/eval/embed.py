"""Embeddings of a folder of aligned face images (square crops at the model's input size, e.g. 112 x 112).

Images are found recursively (.jpg .jpeg .png .bmp .webp), sorted by relative path; that order
is the row order of the result. When every image sits in a subfolder, the first path component is
taken as its identity (`DIR/<identity>/<image>`), which gives labels for clustering evaluation.
Input to the network: RGB, (x - 127.5) / 127.5, N x 3 x S x S with S the model's input size, as in training.
Crops of another size are refused unless `resize` (tools/embed.py --resize): largefr.eval.image_size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from largefr.errors import UserError
from largefr.eval.image_size import RESIZE_FLAG, check_crop_size, say_resized
from largefr.eval.verification import embed_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderError(UserError, ValueError):
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


def read_aligned(path: str, image_size: int, *, resize: bool = False) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(image_size x image_size x 3 uint8 RGB of an aligned crop, its stored size when it was resized).

    Another size is refused (ImageSizeError naming both sizes and --resize) unless `resize`.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            resized = check_crop_size(path, image.size, image_size, resize=resize)
            found = image.size
            if resized:
                image = image.resize((image_size, image_size), Image.BILINEAR)  # as .bin images are resized
            return np.asarray(image), found if resized else None
    except OSError as error:
        raise ImageFolderError(f"{path}: unreadable image ({error})") from None


def labels_from_subfolders(names: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """(identity index per name, identity names) from the first path component; None if some image is top-level."""
    parts = [name.split(os.sep, 1) for name in names]
    if any(len(p) < 2 for p in parts):
        return None, None
    identities, labels = np.unique([p[0] for p in parts], return_inverse=True)
    return labels.reshape(-1).astype(np.int64), identities.tolist()


def embed_folder(model: nn.Module, folder: str, *, batch_size: int, device: torch.device | str = "cpu",
                 flip: bool = False, normalize: bool = True, image_size: int = 112,
                 resize: bool = False) -> FolderEmbeddings:
    """Embeddings of every image under `folder` (flip-sum with `flip`; L2-normalized with `normalize`;
    crops of another size than `image_size` resized with `resize`, refused without)."""
    names = list_images(folder)
    chunk = 8 * batch_size  # decoded at a time
    parts, said = [], False
    for start in range(0, len(names), chunk):
        read = [read_aligned(os.path.join(folder, n), image_size, resize=resize) for n in names[start:start + chunk]]
        resized = next((found for _, found in read if found is not None), None)
        if resized is not None and not said:
            say_resized(folder, resized, image_size, how=f"({RESIZE_FLAG}) resized to")
            said = True
        pixels = np.stack([crop for crop, _ in read])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
        parts.append(embed_images(model, tensor, batch_size=batch_size, flip=flip, device=device).cpu())
    embeddings = torch.cat(parts)
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    labels, identities = labels_from_subfolders(names)
    return FolderEmbeddings(names=names, embeddings=embeddings.numpy().astype(np.float32), labels=labels,
                            identities=identities)
