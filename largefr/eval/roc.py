"""ROC of similarity scores and TAR at FAR, as insightface's IJB tables report them.

`roc_curve` gives one point per distinct score (predict "same" when score >= threshold), plus the
origin, like sklearn's `roc_curve` without dropping collinear points. `tar_at_far` picks, for each
target FAR, the ROC point whose FAR is nearest to the target, and among equally near points the one
with the highest TAR: the rule of insightface's `ijb_11.py` table (min |fpr - target| over the
flipped curve). With few negative pairs the nearest point can be far from a small target; the
FAR actually reached is reported next to each TAR.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from largefr.eval import EvaluationError

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(kw_only=True, frozen=True)
class TarAtFar:
    far_target: float
    tar: float
    far: float
    """FAR of the chosen ROC point."""
    threshold: float
    """Score threshold of that point (same when score >= threshold)."""


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.shape != labels.shape or scores.ndim != 1:
        raise EvaluationError(f"scores {scores.shape} and labels {labels.shape} must be 1-D of equal length")
    if not np.isfinite(scores).all():
        raise EvaluationError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if labels.all() or not labels.any():
        raise EvaluationError("a ROC needs positive and negative pairs; the labels hold only one kind")


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), fpr ascending, first point (0, 0) at threshold +inf."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _check_scores(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # last index of each run of equal scores: all pairs tied at a threshold flip together
    ends = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[ends]
    false_positives = ends + 1 - true_positives
    fpr = np.r_[0.0, false_positives / (~labels).sum()]
    tpr = np.r_[0.0, true_positives / labels.sum()]
    return fpr, tpr, np.r_[np.inf, sorted_scores[ends]]


def tar_at_far(scores: np.ndarray, labels: np.ndarray,
               far_targets: tuple[float, ...] = IJB_FAR_TARGETS) -> list[TarAtFar]:
    """TAR at each target FAR (nearest ROC point, highest TAR among ties; see the module docstring)."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    results = []
    for target in far_targets:
        distance = np.abs(fpr - target)
        candidates = np.nonzero(distance == distance.min())[0]
        best = candidates[np.argmax(tpr[candidates])]
        results.append(TarAtFar(far_target=float(target), tar=float(tpr[best]), far=float(fpr[best]),
                                threshold=float(thresholds[best])))
    return results


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC (trapezoids)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
