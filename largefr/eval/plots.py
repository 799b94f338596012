"""PNG plots: pair-similarity histograms (the paper's Figure 2), ROC curves (IJB 1:1), CMC and TPIR (1:N).

matplotlib is an optional extra (`pip install "largefr[eval]"`); the Agg backend is used, so no
display is needed.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from largefr.errors import MissingExtraError
from largefr.eval import EvaluationError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError('plots need matplotlib: pip install "largefr[eval]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(kw_only=True, frozen=True)
class SimilarityStats:
    positive_pairs: int
    negative_pairs: int
    positive_mean: float
    negative_mean: float
    gap: float
    """positive_mean - negative_mean: the margin between the dashed lines of Figure 2."""

    def as_dict(self) -> dict:
        return asdict(self)


def similarity_stats(cosines: np.ndarray, issame: np.ndarray) -> SimilarityStats:
    cosines, issame = np.asarray(cosines, dtype=np.float64), np.asarray(issame, dtype=bool)
    if not issame.any() or issame.all():
        raise EvaluationError("need both positive and negative pairs for the similarity plot")
    positive, negative = float(cosines[issame].mean()), float(cosines[~issame].mean())
    return SimilarityStats(positive_pairs=int(issame.sum()), negative_pairs=int((~issame).sum()),
                           positive_mean=positive, negative_mean=negative, gap=positive - negative)


def _save(fig, out_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)


def plot_similarity(cosines: np.ndarray, issame: np.ndarray, out_path: str, *, title: str = "",
                    bins: int = 100) -> SimilarityStats:
    """Histograms of positive (blue) and negative (red) pair cosines, dashed lines at their means."""
    plt = _pyplot()
    stats = similarity_stats(cosines, issame)
    cosines, issame = np.asarray(cosines, dtype=np.float64), np.asarray(issame, dtype=bool)
    edges = np.linspace(min(-0.2, cosines.min()), max(1.0, cosines.max()), bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax.hist(cosines[~issame], bins=edges, color="tab:red", alpha=0.6,
                label=f"negative pairs ({stats.negative_pairs}), mean {stats.negative_mean:.3f}")
        ax.hist(cosines[issame], bins=edges, color="tab:blue", alpha=0.6,
                label=f"positive pairs ({stats.positive_pairs}), mean {stats.positive_mean:.3f}")
        for mean, color in ((stats.negative_mean, "tab:red"), (stats.positive_mean, "tab:blue")):
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.5)
        tallest = ax.get_ylim()[1]
        ax.set_ylim(0, 1.45 * tallest)  # head room: the gap arrow above the bars, the legend above it
        ax.annotate("", xy=(stats.positive_mean, 1.1 * tallest), xytext=(stats.negative_mean, 1.1 * tallest),
                    arrowprops={"arrowstyle": "<->", "color": "black"})
        ax.text((stats.positive_mean + stats.negative_mean) / 2, 1.13 * tallest, f"gap {stats.gap:.3f}",
                ha="center", va="bottom", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("pairs")
        ax.set_title(title or "pair cosine similarity")
        ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        _save(fig, out_path)
    finally:
        plt.close(fig)
    return stats


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], out_path: str, *, title: str = "ROC") -> None:
    """TAR against FAR (log scale, from 1e-6 or the smallest FAR reached, to 1) for each named (fpr, tpr) curve.

    Points at FAR 0 cannot be drawn on the log axis and are left out.
    """
    plt = _pyplot()
    smallest = min((float(fpr[fpr > 0].min()) for fpr, _ in curves.values() if (fpr > 0).any()), default=1e-6)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    try:
        for name, (fpr, tpr) in curves.items():
            shown = fpr > 0
            ax.plot(fpr[shown], tpr[shown], linewidth=1.2, label=name)
        ax.set_xscale("log")
        ax.set_xlim(min(1e-6, smallest / 2), 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.grid(linestyle="--", linewidth=0.6)
        ax.set_xlabel("False Accept Rate (FAR)")
        ax.set_ylabel("True Accept Rate (TAR)")
        ax.set_title(title)
        ax.legend(loc="lower right")
        fig.tight_layout()
        _save(fig, out_path)
    finally:
        plt.close(fig)


def plot_identification(results: list, out_path: str, *, title: str = "identification") -> None:
    """CMC curves (left) and TPIR against FPIR (right, log scale) of `largefr.eval.identification` results."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        for result in results:
            left.plot(range(1, len(result.cmc_curve) + 1), result.cmc_curve, marker="o", linewidth=1.2,
                      label=f"{result.name} (rank-1 {100 * result.cmc_curve[0]:.2f}%)")
            shown = [(f, t) for f, t in result.tpir_curve if f > 0]
            if shown:
                right.plot(*zip(*shown), marker=".", linewidth=1.2, label=result.name)
        left.set_xlabel("rank")
        left.set_ylabel("identification rate (CMC)")
        left.set_title(f"CMC, {title}")
        right.set_xscale("log")
        right.set_xlim(1e-3, 1.0)
        right.set_xlabel("False Positive Identification Rate (FPIR)")
        right.set_ylabel("True Positive Identification Rate (TPIR)")
        right.set_title(f"TPIR at FPIR, {title}")
        for ax in (left, right):
            ax.set_ylim(0.0, 1.02)
            ax.grid(linestyle="--", linewidth=0.6)
            ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        _save(fig, out_path)
    finally:
        plt.close(fig)
