"""Statistics over seeds: mean +- sample standard deviation, and paired differences with a 95% t interval."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from largefr.errors import MissingExtraError

__all__ = ["Summary", "PairedDifference", "summarize", "paired_difference", "t_quantile"]

CONFIDENCE = 0.95


@dataclass(frozen=True, kw_only=True)
class Summary:
    n: int
    mean: float | None
    std: float | None
    """Sample standard deviation (n - 1 in the denominator); None when n < 2."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    n: int
    """Seeds finished by both the setting and the baseline."""
    mean: float | None
    std: float | None
    low: float | None
    """Lower end of the 95% t interval of the mean difference (n - 1 degrees of freedom); None when n < 2."""
    high: float | None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation of the finite `values`."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Summary(n=0, mean=None, std=None)
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else None
    return Summary(n=n, mean=mean, std=std)


def t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t distribution (scipy, which scikit-learn of the eval extra brings)."""
    try:
        from scipy.stats import t
    except ImportError:
        raise MissingExtraError('confidence intervals need scipy: pip install "largefr[eval]" (or pip install scipy)') from None
    return float(t.ppf(probability, dof))


def paired_difference(setting: Mapping[int, float], baseline: Mapping[int, float]) -> PairedDifference:
    """Mean of setting - baseline over the seeds both have (keys: seed), with its 95% t interval."""
    seeds = sorted(s for s in setting if s in baseline and setting[s] is not None and baseline[s] is not None
                   and math.isfinite(setting[s]) and math.isfinite(baseline[s]))
    summary = summarize([setting[s] - baseline[s] for s in seeds])
    if summary.n < 2:
        note = "no seed finished by both" if summary.n == 0 else "n < 2: no interval"
        return PairedDifference(n=summary.n, mean=summary.mean, std=None, low=None, high=None, note=note)
    half = t_quantile(0.5 + CONFIDENCE / 2, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return PairedDifference(n=summary.n, mean=summary.mean, std=summary.std, low=summary.mean - half,
                            high=summary.mean + half)
