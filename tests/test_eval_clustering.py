"""Clustering metrics on hand-computed cases, k-means/DBSCAN on separable data, and the tool."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from largefr.eval.clustering import bcubed, evaluate_clustering, nmi, noise_as_singletons
from tests.eval_fixtures import load_tool

# 6 items, true identities 0 0 0 1 1 2, predicted clusters {0, 1} and {2, 3, 4, 5}
TRUTH = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([5, 5, 9, 9, 9, 9])


def test_bcubed_hand_computed():
    # precision per item: 2/2, 2/2, 1/4, 2/4, 2/4, 1/4 -> 7/12; recall: 2/3, 2/3, 1/3, 2/2, 2/2, 1/1 -> 7/9
    precision, recall, fscore = bcubed(PREDICTED, TRUTH)
    assert precision == pytest.approx(7 / 12)
    assert recall == pytest.approx(7 / 9)
    assert fscore == pytest.approx(2 / 3)  # 2 * 7/12 * 7/9 / (7/12 + 7/9)


def test_nmi_hand_computed():
    log = math.log
    mutual = (1 / 3) * log(2) - (1 / 6) * log(2) + (1 / 3) * log(3 / 2) + (1 / 6) * log(3 / 2)
    entropy_clusters = -(1 / 3 * log(1 / 3) + 2 / 3 * log(2 / 3))
    entropy_truth = -(1 / 2 * log(1 / 2) + 1 / 3 * log(1 / 3) + 1 / 6 * log(1 / 6))
    assert nmi(PREDICTED, TRUTH) == pytest.approx(mutual / ((entropy_clusters + entropy_truth) / 2))


def test_limit_cases():
    assert bcubed(TRUTH, TRUTH) == pytest.approx((1.0, 1.0, 1.0))
    assert nmi(TRUTH + 10, TRUTH) == pytest.approx(1.0)  # ids need not match, only the partition
    one_cluster = np.zeros(6)
    assert bcubed(one_cluster, TRUTH)[:2] == pytest.approx(((9 + 4 + 1) / 36, 1.0))
    assert nmi(one_cluster, TRUTH) == pytest.approx(0.0, abs=1e-12)
    singletons = np.arange(6)
    assert bcubed(singletons, TRUTH)[:2] == pytest.approx((1.0, (3 * 1 / 3 + 2 * 1 / 2 + 1) / 6))
    assert nmi(np.zeros(4), np.ones(4)) == 1.0  # both a single group
    assert noise_as_singletons(np.array([-1, 0, 0, -1, 1])).tolist() == [2, 0, 0, 3, 1]


def test_nmi_equals_sklearn_on_random_labelings():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = np.random.default_rng(0)
    for _ in range(5):
        truth, predicted = generator.integers(0, 7, 200), generator.integers(0, 11, 200)
        assert nmi(predicted, truth) == pytest.approx(metrics.normalized_mutual_info_score(truth, predicted), abs=1e-12)


def _blobs(seed: int = 0, identities: int = 4, per_identity: int = 6, dim: int = 16):
    generator = np.random.default_rng(seed)
    centers = generator.normal(size=(identities, dim))
    embeddings = np.repeat(centers, per_identity, axis=0) + 0.02 * generator.normal(size=(identities * per_identity, dim))
    return 3.0 * embeddings, np.repeat(np.arange(identities), per_identity)  # scale: clustering normalizes


def test_kmeans_and_dbscan_recover_separable_identities():
    pytest.importorskip("sklearn")
    embeddings, labels = _blobs()
    kmeans = evaluate_clustering(embeddings, labels, "kmeans")
    assert (kmeans.parameters["k"], kmeans.clusters, kmeans.fscore, kmeans.nmi) == (4, 4, pytest.approx(1.0),
                                                                                     pytest.approx(1.0))
    outlier = np.random.default_rng(5).normal(size=(1, embeddings.shape[1]))
    dbscan = evaluate_clustering(np.vstack([embeddings, outlier]), np.r_[labels, 99], "dbscan", eps=0.05,
                                 min_samples=3)
    assert (dbscan.noise, dbscan.clusters, dbscan.fscore, dbscan.nmi) == (1, 5, pytest.approx(1.0), pytest.approx(1.0))
    merged = evaluate_clustering(embeddings, labels, "dbscan", eps=1.9, min_samples=2)  # radius covers everything
    assert merged.clusters == 1 and merged.recall == pytest.approx(1.0) and merged.precision == pytest.approx(0.25)


def test_tool_writes_the_metrics(tmp_path, capsys):
    pytest.importorskip("sklearn")
    embeddings, labels = _blobs(seed=1)
    np.save(tmp_path / "x.npy", embeddings.astype(np.float32))
    np.save(tmp_path / "y.npy", labels)
    tool = load_tool("eval_clustering")
    assert tool.main(["--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
                      "kmeans", "--k", "3", "--json", str(tmp_path / "r.json")]) == 0
    result = json.load(open(tmp_path / "r.json"))
    predicted_clusters = result["clusters"]
    assert predicted_clusters == 3 and result["recall"] == pytest.approx(1.0)  # two identities merged
    assert result["precision"] == pytest.approx((6 + 6 + 0.5 * 12) / 24)
    assert "BCubed precision 75.00" in capsys.readouterr().out
    np.save(tmp_path / "short.npy", labels[:-1])
    assert tool.main(["--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "short.npy"),
                      "--method", "dbscan"]) == 2
    assert "has shape [24, 16] but --labels" in capsys.readouterr().err
    assert tool.main(["--embeddings", str(tmp_path / "none.npy"), "--labels", str(tmp_path / "y.npy"),
                      "--method", "kmeans"]) == 2
    assert "none.npy: no such file" in capsys.readouterr().err
