"""Face clustering evaluation (the paper's Table 5): k-means or DBSCAN on embeddings, BCubed and NMI.

Metrics, for a predicted clustering against the true identities of N items:
- BCubed (Amigo et al. 2009): item i's precision is the share of its cluster that has its identity,
  its recall the share of its identity that is in its cluster; P and R are their means over items,
  F = 2PR / (P + R). With n_ij items of identity j in cluster i: P = sum n_ij^2 / |cluster i| / N,
  R = sum n_ij^2 / |identity j| / N.
- NMI: mutual information over the arithmetic mean of the two entropies (sklearn's default
  `normalized_mutual_info_score`); 1 when both partitions are a single group.

Embeddings are L2-normalized before clustering. k-means runs on them (Euclidean distance of unit
vectors orders pairs like cosine similarity) with k = number of true identities by default. DBSCAN
uses the cosine distance 1 - cos, so `eps` is a cosine distance; DBSCAN's noise points (label -1)
count as singleton clusters, each its own cluster, in the metrics.
scikit-learn is an optional extra: `pip install "largefr[eval]"`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from largefr.errors import MissingExtraError
from largefr.eval import EvaluationError

CLUSTERING_METHODS = ("kmeans", "dbscan")


def _contingency(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts n_ij of items in predicted cluster i with true label j."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise EvaluationError(f"predicted {predicted.shape} and true labels {truth.shape} must be 1-D of equal length")
    if predicted.size == 0:
        raise EvaluationError("no items to evaluate")
    _, cluster = np.unique(predicted, return_inverse=True)
    _, label = np.unique(truth, return_inverse=True)
    table = np.zeros((cluster.max() + 1, label.max() + 1), dtype=np.float64)
    np.add.at(table, (cluster.reshape(-1), label.reshape(-1)), 1.0)
    return table


def bcubed(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F) of BCubed; see the module docstring."""
    table = _contingency(predicted, truth)
    squared = np.square(table)
    total = table.sum()
    precision = float((squared / table.sum(axis=1, keepdims=True)).sum() / total)
    recall = float((squared / table.sum(axis=0, keepdims=True)).sum() / total)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _entropy(counts: np.ndarray) -> float:
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def nmi(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Normalized mutual information, arithmetic-mean normalization (natural log; the base cancels)."""
    table = _contingency(predicted, truth)
    if table.shape == (1, 1):
        return 1.0
    joint = table / table.sum()
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())
    if mutual <= 0:
        return 0.0
    return mutual / ((_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))) / 2)


def noise_as_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels with every -1 (noise) replaced by a fresh cluster id of its own."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    noise = labels < 0
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return labels


def _sklearn():
    try:
        import sklearn.cluster
    except ImportError:
        raise MissingExtraError('clustering needs scikit-learn: pip install "largefr[eval]" (or pip install scikit-learn)') from None
    return sklearn.cluster


def normalize_rows(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)


def kmeans_labels(embeddings: np.ndarray, num_clusters: int, *, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ init) cluster ids of the L2-normalized embeddings."""
    if not 1 <= num_clusters <= len(embeddings):
        raise EvaluationError(f"k-means needs 1 <= k <= {len(embeddings)} (the number of embeddings), got k={num_clusters}")
    model = _sklearn().KMeans(n_clusters=num_clusters, n_init="auto", random_state=seed)
    return model.fit_predict(normalize_rows(embeddings))


DBSCAN_EPS = 0.2
"""Default DBSCAN radius (cosine distance 1 - cos: neighbours above cosine 0.8) of every tool: the radius
docs/EXPERIMENTS.md found best for every setting of the quickstart's 200-step models (its eps table)."""
DBSCAN_MIN_SAMPLES = 2
"""Default DBSCAN core-point neighbours."""


def dbscan_labels(embeddings: np.ndarray, *, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN cluster ids (noise: -1) under the cosine distance of the embeddings."""
    if eps <= 0 or min_samples < 1:
        raise EvaluationError(f"DBSCAN needs eps > 0 and min_samples >= 1, got eps={eps}, min_samples={min_samples}")
    model = _sklearn().DBSCAN(eps=eps, min_samples=min_samples, metric="cosine", algorithm="brute")
    return model.fit_predict(normalize_rows(embeddings))


@dataclass(kw_only=True)
class ClusteringResult:
    method: str
    parameters: dict = field(default_factory=dict)
    items: int = 0
    identities: int = 0
    clusters: int = 0
    """Predicted clusters, DBSCAN noise points counted as singletons."""
    noise: int = 0
    precision: float = 0.0
    recall: float = 0.0
    fscore: float = 0.0
    nmi: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def score_clustering(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """BCubed precision/recall/F and NMI of cluster ids (noise -1 as singletons) against true labels."""
    predicted = noise_as_singletons(predicted)
    precision, recall, fscore = bcubed(predicted, truth)
    return {"precision": precision, "recall": recall, "fscore": fscore, "nmi": nmi(predicted, truth)}


def evaluate_clustering(embeddings: np.ndarray, labels: np.ndarray, method: str, *, num_clusters: int | None = None,
                        eps: float = DBSCAN_EPS, min_samples: int = DBSCAN_MIN_SAMPLES, seed: int = 0) -> ClusteringResult:
    """Cluster `embeddings` with `method` ('kmeans' or 'dbscan') and score against `labels`."""
    embeddings, labels = np.asarray(embeddings), np.asarray(labels).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise EvaluationError(f"embeddings {embeddings.shape} must be N x d with one label each ({labels.shape[0]} labels)")
    identities = int(np.unique(labels).size)
    started = time.perf_counter()
    if method == "kmeans":
        parameters = {"k": num_clusters or identities, "seed": seed}
        predicted = kmeans_labels(embeddings, parameters["k"], seed=seed)
    elif method == "dbscan":
        parameters = {"eps": eps, "min_samples": min_samples, "metric": "cosine"}
        predicted = dbscan_labels(embeddings, eps=eps, min_samples=min_samples)
    else:
        raise EvaluationError(f"unknown clustering method {method!r}; choose one of {CLUSTERING_METHODS}")
    scores = score_clustering(predicted, labels)
    return ClusteringResult(method=method, parameters=parameters, items=int(labels.size), identities=identities,
                            clusters=int(np.unique(noise_as_singletons(predicted)).size),
                            noise=int((predicted < 0).sum()), seconds=time.perf_counter() - started, **scores)


def format_clustering(result: ClusteringResult) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in result.parameters.items())
    return (f"{result.method} ({settings}): {result.items} items, {result.identities} identities -> "
            f"{result.clusters} clusters ({result.noise} noise points as singletons)\n"
            f"BCubed precision {100 * result.precision:.2f}  recall {100 * result.recall:.2f}  "
            f"F {100 * result.fscore:.2f}   NMI {100 * result.nmi:.2f}")
