"""Evaluate a backbone on insightface verification .bin files (LFW, CFP-FP, CPLFW, AgeDB-30, CALFW).

Per file: flip-sum embeddings of every image, 10-fold accuracy and best threshold exactly as
`largefr.eval.verification` computes them (insightface's protocol), and TAR at FAR 1e-3 from the
cosine similarity of each pair's normalized embeddings (the ROC rule of `largefr.eval.roc`).
Images are decoded and embedded in chunks, so a large .bin never sits in memory as float pixels.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from largefr.data.verification_bin import decode_pairs, load_bin
from largefr.eval.collapse import collapse_warning, mean_pairwise_cosine
from largefr.eval.image_size import announce_bin_resize, image_size_of
from largefr.eval.roc import tar_at_far
from largefr.eval.verification import embed_images, verification_accuracy

DECODE_CHUNK_BATCHES = 8  # images decoded at once = this x batch size


@dataclass(kw_only=True)
class PairEmbeddings:
    embeddings: np.ndarray
    """2N x d float32 raw (flip-sum) embeddings; pair i is rows 2i and 2i+1."""
    issame: np.ndarray
    """N bools."""

    def cosines(self) -> np.ndarray:
        """Cosine similarity of each pair's two embeddings (float64)."""
        normalized = self.embeddings.astype(np.float64)
        normalized /= np.linalg.norm(normalized, axis=1, keepdims=True).clip(min=1e-12)
        return np.sum(normalized[0::2] * normalized[1::2], axis=1)


@dataclass(kw_only=True)
class BinResult:
    name: str
    path: str
    pairs: int
    accuracy: float
    std: float
    best_threshold: float
    """Squared L2 distance between normalized embeddings, mean over folds (cosine = 1 - d / 2)."""
    tar: float
    far: float
    far_target: float
    seconds: float
    mean_cosine: float = float("nan")
    """Mean pairwise cosine of all the set's embeddings; above COLLAPSED_MEAN_COSINE the model collapsed."""

    def as_dict(self) -> dict:
        return asdict(self)


def embed_bin(model: nn.Module, path: str, *, batch_size: int, device: torch.device | str = "cpu",
              flip: bool = True, image_size: int | None = None) -> PairEmbeddings:
    """Flip-sum embeddings of every image of the .bin at `path` (at the model's input side by default; images
    of another size are resized, with one line saying so)."""
    image_size = image_size or image_size_of(model)
    images, issame = load_bin(path)
    announce_bin_resize(path, images, image_size)
    chunk = max(1, DECODE_CHUNK_BATCHES * batch_size)
    parts = []
    for start in range(0, len(images), chunk):
        pixels = decode_pairs(images[start:start + chunk], image_size, source=f"{path} (from image {start})")
        parts.append(embed_images(model, pixels, batch_size=batch_size, flip=flip, device=device).cpu())
    return PairEmbeddings(embeddings=torch.cat(parts).numpy().astype(np.float32), issame=np.asarray(issame, bool))


def score_pairs(pairs: PairEmbeddings, *, name: str, path: str, far_target: float = 1e-3,
                seconds: float = 0.0) -> BinResult:
    """10-fold accuracy and TAR at `far_target` of embedded pairs."""
    verification = verification_accuracy(pairs.embeddings, pairs.issame)
    tar = tar_at_far(pairs.cosines(), pairs.issame, (far_target,))[0]
    return BinResult(name=name, path=path, pairs=int(pairs.issame.size), accuracy=verification.accuracy,
                     std=verification.std, best_threshold=verification.best_threshold, tar=tar.tar, far=tar.far,
                     far_target=far_target, seconds=seconds, mean_cosine=mean_pairwise_cosine(pairs.embeddings))


def evaluate_bin(model: nn.Module, path: str, *, batch_size: int, device: torch.device | str = "cpu",
                 far_target: float = 1e-3) -> BinResult:
    """Embed and score one verification .bin; the set's name is the file name without '.bin'."""
    started = time.perf_counter()
    pairs = embed_bin(model, path, batch_size=batch_size, device=device, image_size=image_size_of(model))
    name = os.path.splitext(os.path.basename(path))[0]
    return score_pairs(pairs, name=name, path=path, far_target=far_target, seconds=time.perf_counter() - started)


def format_table(results: list[BinResult]) -> str:
    """Fixed-width table: one row per .bin."""
    header = f"{'set':<14} {'pairs':>6} {'accuracy':>17} {'threshold':>9} {'TAR@FAR':>8} {'(FAR)':>9} {'sec':>7}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.name:<14} {r.pairs:>6} {100 * r.accuracy:>9.2f} +- {100 * r.std:<4.2f} "
                    f"{r.best_threshold:>9.3f} {100 * r.tar:>8.2f} {r.far:>9.2e} {r.seconds:>7.1f}")
    if results:
        rows.append(f"TAR at FAR {results[0].far_target:g} (the FAR reached in brackets); threshold: squared L2 "
                    "distance of normalized flip-sum embeddings, mean of the 10 folds")
    rows += filter(None, (collapse_warning(r.name, r.mean_cosine, 2 * r.pairs) for r in results))
    return "\n".join(rows)
