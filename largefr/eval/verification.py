"""Pair verification accuracy as insightface computes it (LFW, CFP-FP, AgeDB-30 .bin files).

Protocol (insightface `recognition/arcface_torch/eval/verification.py`): embeddings of each image
and of its horizontal flip are summed ("flip test") and L2-normalized; pair distance is the squared
Euclidean distance; the pairs are split into 10 contiguous folds (sklearn's KFold without
shuffling: the first n % k folds hold one extra pair); for each fold the threshold in
0, 0.01, ..., 3.99 with the best accuracy on the other 9 folds (first one on ties) is applied to
the held-out fold; the result is the mean and standard deviation of the 10 fold accuracies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_gather_variable_rows
from largefr.eval import EvaluationError

THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass(kw_only=True, frozen=True)
class VerificationResult:
    accuracy: float
    """Mean held-out accuracy over the folds."""
    std: float
    """Standard deviation of the fold accuracies."""
    best_threshold: float
    """Mean over folds of the chosen squared-distance threshold."""


def kfold_splits(num_pairs: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of sklearn's KFold(n_splits, shuffle=False)."""
    if num_pairs < num_folds:
        raise EvaluationError(f"{num_pairs} pairs cannot be split into {num_folds} folds; use fewer folds")
    sizes = np.full(num_folds, num_pairs // num_folds)
    sizes[: num_pairs % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.arange(num_pairs)
    return [(np.concatenate([indices[:lo], indices[hi:]]), indices[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def accuracy_per_threshold(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of `distance < threshold` as the same-identity prediction, for every threshold."""
    predicted = distances[None, :] < thresholds[:, None]
    return (predicted == issame[None, :]).mean(axis=1)


def verification_accuracy(embeddings: np.ndarray | torch.Tensor, issame: np.ndarray | list[bool], *,
                          num_folds: int = 10, thresholds: np.ndarray = THRESHOLDS) -> VerificationResult:
    """10-fold accuracy of pairs (rows 2i, 2i+1 of `embeddings`; L2-normalized here)."""
    embeddings = torch.as_tensor(embeddings, dtype=torch.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {issame.shape[0]} pairs; expected two per pair")
    normalized = F.normalize(embeddings, dim=1).numpy()
    distances = np.square(normalized[0::2] - normalized[1::2]).sum(axis=1)
    accuracies, chosen = [], []
    for train, test in kfold_splits(issame.shape[0], num_folds):
        best = int(np.argmax(accuracy_per_threshold(distances[train], issame[train], thresholds)))
        chosen.append(thresholds[best])
        accuracies.append(accuracy_per_threshold(distances[test], issame[test], thresholds[best:best + 1])[0])
    return VerificationResult(accuracy=float(np.mean(accuracies)), std=float(np.std(accuracies)),
                              best_threshold=float(np.mean(chosen)))


def share_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the contiguous share of `total` items that `rank` embeds (ceil split)."""
    per_rank = -(-total // world_size)
    return min(rank * per_rank, total), min((rank + 1) * per_rank, total)


def load_verification_share(path: str, *, image_size: int, rank: int = 0, world_size: int = 1
                            ) -> tuple[torch.Tensor, list[bool], int]:
    """(uint8 images of this rank's share, N x 3 x H x W; every pair's issame; total image count).

    Only this rank's share is decoded and kept, as uint8 (a quarter of float32's memory; a full
    LFW in float32 is 1.8 GB per rank).
    """
    from largefr.data.verification_bin import decode_image, load_bin

    images, issame = load_bin(path)
    start, end = share_range(len(images), world_size, rank)
    decoded = [decode_image(images[i], image_size, f"{path} image {i}") for i in range(start, end)]
    if decoded:
        share = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    else:
        share = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    return share, list(issame), len(images)


def _as_model_input(batch: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 pixels -> (x - 127.5) / 127.5 as the training loaders give; float input passes through."""
    if batch.dtype == torch.uint8:
        batch = batch.to(device=device, dtype=torch.float32).sub_(127.5).div_(127.5)
    return batch.to(device=device, dtype=dtype)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int, flip: bool = True,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 embedding_size: int = 0) -> torch.Tensor:
    """float32 embeddings of `images` (N x 3 x H x W, uint8 pixels or normalized floats); with
    `flip`, plus those of the mirrored images. No images: a 0 x embedding_size tensor."""
    was_training = model.training
    model.eval()
    try:
        chunks = [torch.zeros(0, embedding_size, device=device)]
        for start in range(0, images.shape[0], batch_size):
            batch = _as_model_input(images[start:start + batch_size], device, dtype)
            embedding = model(batch).float()
            if flip:
                embedding = embedding + model(torch.flip(batch, dims=[3])).float()
            chunks.append(embedding)
        return torch.cat(chunks if len(chunks) == 1 else chunks[1:])
    finally:
        model.train(was_training)


def embed_images_distributed(model: torch.nn.Module, local_images: torch.Tensor, *, batch_size: int,
                             embedding_size: int, flip: bool = True, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32, group: ProcessGroup | None = None) -> torch.Tensor:
    """Embed this rank's share (`share_range` order); every rank returns all embeddings, in order."""
    local = embed_images(model, local_images, batch_size=batch_size, flip=flip, device=device, dtype=dtype,
                         embedding_size=embedding_size)
    return all_gather_variable_rows(local, group).cpu()
