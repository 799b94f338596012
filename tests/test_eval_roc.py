"""ROC points and TAR at FAR against loops written out plainly."""
from __future__ import annotations

import numpy as np
import pytest

from largefr.eval.roc import roc_auc, roc_curve, tar_at_far


def brute_force_roc(scores, labels):
    """(fpr, tpr) at threshold +inf and at every distinct score, predicting same when score >= threshold."""
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    points = [(0.0, 0.0)]
    for threshold in sorted(set(scores), reverse=True):
        accepted = [y for s, y in zip(scores, labels) if s >= threshold]
        points.append((sum(1 for y in accepted if not y) / negatives, sum(1 for y in accepted if y) / positives))
    return points


def brute_force_tar(points, target):
    """insightface's rule: the point whose FAR is nearest the target, highest TAR among the nearest."""
    nearest = min(abs(far - target) for far, _ in points)
    return max(tar for far, tar in points if abs(far - target) == nearest)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_tar_match_brute_force(seed):
    generator = np.random.default_rng(seed)
    labels = generator.random(300) < 0.3
    scores = np.round(generator.normal(size=300) + 1.5 * labels, 1)  # rounding makes ties across labels
    fpr, tpr, thresholds = roc_curve(scores, labels)
    expected = brute_force_roc(scores.tolist(), labels.tolist())
    np.testing.assert_allclose(np.stack([fpr, tpr], axis=1), np.array(expected), rtol=0, atol=1e-12)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds[1:]) < 0)
    targets = (1e-3, 0.01, 0.05, 0.1, 0.3)
    for result, target in zip(tar_at_far(scores, labels, targets), targets):
        assert result.tar == pytest.approx(brute_force_tar(expected, target), abs=1e-12)
        accepted = scores >= result.threshold
        assert result.far == pytest.approx(accepted[~labels].mean(), abs=1e-12)
        assert result.tar == pytest.approx(accepted[labels].mean(), abs=1e-12)


def test_hand_computed_case():
    # scores 0.9(+) 0.8(-) 0.7(+) 0.6(-) 0.5(+): ROC (0,0) (0,1/3) (1/2,1/3) (1/2,2/3) (1,2/3) (1,1)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([True, False, True, False, True])
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    # FAR 0.4 is nearest to 0.5, where the highest TAR is 2/3 (threshold 0.7)
    result = tar_at_far(scores, labels, (0.4,))[0]
    assert (result.tar, result.far, result.threshold) == pytest.approx((2 / 3, 0.5, 0.7))
    assert roc_auc(fpr, tpr) == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 3)


def test_one_kind_of_labels_refused():
    with pytest.raises(ValueError, match="only one kind"):
        roc_curve(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        roc_curve(np.array([0.1, np.nan]), np.array([True, False]))
