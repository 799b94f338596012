"""A collapsed embedding: every image maps to (nearly) the same direction, so any accuracy is chance.

A short or broken run can end there (the BatchNorm statistics of a 20-step model, a dead learning rate):
verification then reports ~50% with a gap of 0, which reads like a result. The mean pairwise cosine of
the normalized embeddings says it: ~0 for a spread embedding, 1 when collapsed.
"""
from __future__ import annotations

import numpy as np

COLLAPSED_MEAN_COSINE = 0.99
"""Mean pairwise cosine above which embeddings are called collapsed (evaluation warns, tables mark the run)."""


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows (float64; O(N d): |sum of unit rows|^2 = N + sum over pairs)."""
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.shape[0] < 2:
        return float("nan")
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-12)
    total = unit.sum(axis=0)
    count = rows.shape[0]
    return float((total @ total - np.sum(unit * unit)) / (count * (count - 1)))


def is_collapsed(mean_cosine: float | None) -> bool:
    return mean_cosine is not None and np.isfinite(mean_cosine) and mean_cosine > COLLAPSED_MEAN_COSINE


def collapse_warning(what: str, mean_cosine: float, images: int) -> str | None:
    """One warning line when `what`'s embeddings collapsed, else None."""
    if not is_collapsed(mean_cosine):
        return None
    return (f"warning: {what}: embeddings collapsed (mean pairwise cosine {mean_cosine:.4f} over {images} images, "
            f"above {COLLAPSED_MEAN_COSINE}): every image looks alike, the accuracy is chance, not a result")
