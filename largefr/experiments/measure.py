"""Measure a finished run on its final checkpoint: verification, pair-similarity gap, held-out clustering.

Everything here is the evaluation library's (largefr.eval): the backbone comes from the checkpoint as
tools/eval_verification.py loads it, each verification .bin is embedded once (flip-sum) and scored as
`evaluate_bin` scores it (10-fold accuracy, TAR at FAR 1e-3) and its pair cosines give the positive
and negative means and gap of the paper's Figure 2; the held-out folder of identity sub-folders is
embedded (flip-sum, normalized) and clustered with k-means (k = its number of identities) and DBSCAN
(cosine distance, `eps`), each scored by BCubed F and NMI (the paper's Table 5).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from largefr.config import Config
from largefr.data.prepare import training_folder, verification_paths
from largefr.errors import UsageError
from largefr.eval.clustering import DBSCAN_EPS, DBSCAN_MIN_SAMPLES

__all__ = ["MeasureOptions", "measured_with", "DEFAULT_DBSCAN_EPS", "DBSCAN_MIN_SAMPLES", "FAR_TARGET", "measure_run",
           "heldout_identity_count", "flat_metrics"]

# One fixed radius (largefr.eval.clustering.DBSCAN_EPS, the tools' one default), so every setting and seed
# is clustered alike. It was 0.3 until 2026-12-06 (the tables of docs/EXPERIMENTS.md measured so):
# `--dbscan-eps 0.3` reproduces them and reuses their runs.
DEFAULT_DBSCAN_EPS = DBSCAN_EPS
FAR_TARGET = 1e-3


@dataclass(frozen=True, kw_only=True)
class MeasureOptions:
    heldout_dir: str | None
    """Folder of identity sub-folders to cluster; None: no clustering columns."""
    dbscan_eps: float = DEFAULT_DBSCAN_EPS
    device: str = "cpu"


def measured_with(options: MeasureOptions) -> dict[str, Any]:
    """What decides the clustering columns; a finished run measured otherwise is not mixed into a table."""
    return {"heldout": os.path.abspath(options.heldout_dir) if options.heldout_dir else None,
            "dbscan_eps": options.dbscan_eps}


def heldout_identity_count(folder: str) -> int:
    """Identities of a folder of identity sub-folders; an error naming the folder when it has none."""
    from largefr.eval.embed import labels_from_subfolders, list_images

    labels, identities = labels_from_subfolders(list_images(folder))
    if labels is None or len(identities) < 2:
        raise UsageError(f"--heldout {folder}: needs images in at least two identity sub-folders "
                         "(<folder>/<identity>/<image>.jpg), to cluster them")
    return len(identities)


def _verification(config: Config, model, device: str) -> dict[str, dict[str, Any]]:
    from largefr.eval.pairs import embed_bin, image_size_of, score_pairs
    from largefr.eval.plots import similarity_stats
    results = {}
    data = config.data
    for name, path in verification_paths(data, training_folder(data)):
        pairs = embed_bin(model, path, batch_size=config.eval.batch_size, device=device, image_size=image_size_of(model))
        scores = score_pairs(pairs, name=name, path=path, far_target=FAR_TARGET).as_dict()
        results[name] = {**scores, **similarity_stats(pairs.cosines(), pairs.issame).as_dict()}
    return results


def _clustering(config: Config, model, options: MeasureOptions) -> dict[str, dict[str, Any]]:
    from largefr.eval.clustering import evaluate_clustering
    from largefr.eval.embed import embed_folder

    folder = embed_folder(model, options.heldout_dir, batch_size=config.eval.batch_size, device=options.device,
                          flip=True, image_size=config.data.image_size)
    return {"kmeans": evaluate_clustering(folder.embeddings, folder.labels, "kmeans", seed=0).as_dict(),
            "dbscan": evaluate_clustering(folder.embeddings, folder.labels, "dbscan", eps=options.dbscan_eps,
                                          min_samples=DBSCAN_MIN_SAMPLES).as_dict()}


def measure_run(config: Config, options: MeasureOptions) -> dict[str, Any]:
    """Verification and clustering results of the latest checkpoint under the run's checkpoint folder."""
    from largefr.eval.weights import load_backbone

    loaded = load_backbone(checkpoint=str(config.checkpoint_dir), network=config.model.network,
                           embedding_size=config.model.embedding_size, device=options.device)
    measured = {"checkpoint": loaded.source, "measured_with": measured_with(options),
                "verification": _verification(config, loaded.model, options.device)}
    if options.heldout_dir is not None:
        measured["heldout"] = {"folder": os.path.abspath(options.heldout_dir),
                               **_clustering(config, loaded.model, options)}
    return measured


def flat_metrics(measured: dict[str, Any], wall_seconds: float) -> dict[str, float]:
    """The table's columns of one run: '<set>/accuracy', '<set>/tar', '<set>/gap', 'heldout/kmeans_f', ..."""
    metrics = {}
    for name, result in measured["verification"].items():
        metrics.update({f"{name}/accuracy": result["accuracy"], f"{name}/tar": result["tar"],
                        f"{name}/gap": result["gap"], f"{name}/positive_mean": result["positive_mean"],
                        f"{name}/negative_mean": result["negative_mean"]})
        if "mean_cosine" in result:  # measured since 2026-12-06
            metrics[f"{name}/mean_cosine"] = result["mean_cosine"]
    for method in ("kmeans", "dbscan"):
        if "heldout" in measured:
            metrics[f"heldout/{method}_f"] = measured["heldout"][method]["fscore"]
            metrics[f"heldout/{method}_nmi"] = measured["heldout"][method]["nmi"]
    metrics["wall_seconds"] = wall_seconds
    return metrics
