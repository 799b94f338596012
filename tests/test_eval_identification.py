"""CMC, TPIR at FPIR and TAR at FAR (largefr.eval.identification) against plain brute-force definitions.

Scores are small integers so that ties are frequent and exact.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from largefr.eval.identification import (IdentificationError, check_closed_set, cmc, identify,
                                         mate_ranks, tar_at_far, tpir_at_fpir)


def brute_candidates(scores: list[float], k: int) -> list[int]:
    """Gallery indices by score descending, lower index first among equal scores."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]


def brute_cmc(score_matrix: np.ndarray, probe_labels, gallery_labels, ranks) -> dict[int, float]:
    mate_positions = []
    for scores, label in zip(score_matrix.tolist(), probe_labels):
        if label not in list(gallery_labels):
            continue
        order = brute_candidates(scores, len(scores))
        mate_positions.append(next(p for p, j in enumerate(order, 1) if gallery_labels[j] == label))
    return {r: sum(p <= r for p in mate_positions) / len(mate_positions) for r in ranks}


def brute_rate_at(negatives: list[float], positives_accepted_above, positive_total: int, target: float):
    """Max over thresholds t (accept score > t) with share of negatives > t <= target: (rate, reached, t)."""
    best = None
    for t in sorted({-math.inf, *negatives}):
        reached = sum(s > t for s in negatives) / len(negatives)
        if reached <= target + 1e-12:
            rate = sum(s > t for s in positives_accepted_above) / positive_total
            if best is None:  # the lowest admissible threshold accepts the most
                best = (rate, reached, t)
    return best


def brute_tpir(score_matrix: np.ndarray, probe_labels, gallery_labels, target: float):
    mated_hits, nonmated_tops, mated_count = [], [], 0
    for scores, label in zip(score_matrix.tolist(), probe_labels):
        first = brute_candidates(scores, 1)[0]
        if label in list(gallery_labels):
            mated_count += 1
            if gallery_labels[first] == label:
                mated_hits.append(scores[first])
        else:
            nonmated_tops.append(scores[first])
    return brute_rate_at(nonmated_tops, mated_hits, mated_count, target)


def _random_case(seed: int, probes: int = 40, gallery: int = 12, identities: int = 9):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=(probes, gallery)).astype(np.float64)
    gallery_labels = rng.integers(0, identities - 2, size=gallery)  # identities 7, 8 only in probes
    probe_labels = rng.integers(0, identities, size=probes)
    return scores, probe_labels, gallery_labels


def _candidate_lists(scores: np.ndarray, gallery_labels: np.ndarray, k: int):
    order = np.array([brute_candidates(row, k) for row in scores.tolist()])
    return np.take_along_axis(scores, order, axis=1), gallery_labels[order]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cmc_and_tpir_match_brute_force_with_ties(seed):
    scores, probe_labels, gallery_labels = _random_case(seed)
    candidate_scores, candidate_labels = _candidate_lists(scores, gallery_labels, 10)
    mated = np.isin(probe_labels, gallery_labels)
    assert 0 < mated.sum() < mated.size
    ranks = mate_ranks(candidate_labels, probe_labels)
    assert cmc(ranks, mated, (1, 5, 10)) == pytest.approx(brute_cmc(scores, probe_labels, gallery_labels, (1, 5, 10)))
    for target in (0.5, 0.2, 0.1, 0.05, 0.01):
        rate = tpir_at_fpir(candidate_scores[:, 0], ranks == 1, mated, (target,))[0]
        expected_rate, expected_reached, expected_threshold = brute_tpir(scores, probe_labels, gallery_labels, target)
        assert (rate.rate, rate.reached, rate.threshold) == pytest.approx(
            (expected_rate, expected_reached, expected_threshold))
        assert rate.reached <= target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force_from_a_truncated_impostor_list(seed):
    rng = np.random.default_rng(seed)
    genuine = rng.integers(0, 8, size=30).astype(np.float64).tolist()
    impostors = rng.integers(-5, 6, size=400).astype(np.float64).tolist()
    for target in (0.3, 0.1, 0.01, 0.0025, 1e-6):
        keep = math.floor(target * len(impostors)) + 1  # what the search keeps
        top = sorted(impostors, reverse=True)[:keep]
        got = tar_at_far(np.array(genuine), np.array(top), len(impostors), (target,))[0]
        assert (got.rate, got.reached, got.threshold) == pytest.approx(
            brute_rate_at(impostors, genuine, len(genuine), target))


def test_identify_reports_open_set_rates_only_with_nonmated_probes():
    scores, probe_labels, gallery_labels = _random_case(5)
    candidate_scores, candidate_labels = _candidate_lists(scores, gallery_labels, 10)
    mated = np.isin(probe_labels, gallery_labels)
    result = identify("G", candidate_scores, candidate_labels, probe_labels, mated, len(gallery_labels))
    assert result.mated_probes == mated.sum() and len(result.tpir_at_fpir) == 2
    closed = identify("G", candidate_scores[mated], candidate_labels[mated], probe_labels[mated], mated[mated],
                      len(gallery_labels), closed_set=True)
    assert closed.cmc == result.cmc and closed.tpir_at_fpir == []


def test_closed_set_refuses_a_probe_without_mate():
    with pytest.raises(IdentificationError, match=r"template 7 has no mate in the gallery \(1 of 3 probes"):
        check_closed_set(np.array([True, False, True]), ["template 3", "template 7", "template 9"])
    with pytest.raises(IdentificationError, match="CMC at rank 10 needs at least that many candidates"):
        cmc(np.array([1]), np.array([True]), (1, 10), listed=5)
    with pytest.raises(IdentificationError, match="needs mated and non-mated probes"):
        tpir_at_fpir(np.array([1.0, 2.0]), np.array([True, True]), np.array([True, True]))
