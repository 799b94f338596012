"""1:N identification measures: CMC, TPIR at FPIR (open set), TAR at FAR from a truncated impostor list.

Definitions (the code below follows them line by line):

- A *gallery* holds entries with identity labels (one or more per identity; distractors carry
  `NO_IDENTITY`, which matches nothing). A *probe* is *mated* when its identity has an entry in the
  gallery, *non-mated* otherwise.
- A probe's *candidate list* is the gallery sorted by similarity, highest first, ties broken by the
  lower gallery index (so it is unique and the same however the gallery is split across ranks).
- *Mate rank*: the 1-based position of the first entry of the probe's identity in its candidate
  list (0 when not among the first k listed).
- *CMC(r)*: the share of mated probes whose mate rank is 1..r. A closed-set measure: computed over
  mated probes, and `cmc(..., closed_set=True)` refuses probes without a mate.
- *FPIR(t)*: the share of non-mated probes whose first candidate scores above t. *TPIR(t)*: the
  share of mated probes whose first candidate is a mate scoring above t (1 - FNIR at rank 1).
- *TPIR at FPIR f*: TPIR at the lowest threshold whose FPIR is at most f, i.e. t = the
  (floor(f * N) + 1)-th highest non-mated top score (N non-mated probes; accept when score > t).
  Non-mated probes tied at t are all rejected together, so the FPIR reached never exceeds f and
  ties cannot lift it; the FPIR reached is reported next to each TPIR.
- *TAR at FAR f* (MegaFace's verification measure over probe x gallery pairs): the same rule over
  impostor pair scores: t = the (floor(f * M) + 1)-th highest of the M impostor scores, TAR = share
  of genuine pairs scoring above t. Only the floor(f * M) + 1 highest impostor scores are needed,
  which is what lets the sharded search (`largefr.eval.search`) keep a bounded list per rank.

The 1:1 tools (`largefr.eval.roc`) pick the ROC point nearest to the target FAR, as insightface's
IJB 1:1 table does; the rule here never exceeds the target, the convention of NIST's FRVT 1:N.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from largefr.errors import UserError

NO_IDENTITY = -1
"""Identity label of a distractor: matches no probe."""
CMC_RANKS = (1, 5, 10)
FPIR_TARGETS = (1e-1, 1e-2)
SEARCH_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3)
FPIR_CURVE = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0)
"""FPIR values at which the TPIR curve of the plots is sampled."""
_RATE_SLACK = 1e-9  # floor(0.29 * 100) is 28 in binary floating point; rates are counts / totals


class IdentificationError(UserError, ValueError):
    """Probe or gallery sets that a measure cannot be computed on."""


@dataclass(kw_only=True, frozen=True)
class RateAtTarget:
    target: float
    rate: float
    """TPIR (or TAR) at the threshold."""
    reached: float
    """FPIR (or FAR) actually reached there, <= target."""
    threshold: float
    """Accept when score > threshold (-inf: every score is accepted)."""


@dataclass(kw_only=True)
class IdentificationResult:
    name: str
    probes: int
    mated_probes: int
    gallery: int
    cmc: dict[int, float] = field(default_factory=dict)
    """Rank -> share of mated probes with their mate at that rank or better."""
    tpir_at_fpir: list[dict] = field(default_factory=list)
    """One {target, rate, reached, threshold} per FPIR target (none without non-mated probes)."""
    cmc_curve: list[float] = field(default_factory=list)
    """CMC at ranks 1, 2, ... up to the candidates listed (for plots)."""
    tpir_curve: list[tuple[float, float]] = field(default_factory=list)
    """(FPIR reached, TPIR) at each FPIR_CURVE value (for plots)."""

    def as_dict(self) -> dict:
        return asdict(self)


def allowed_count(rate: float, total: int) -> int:
    """How many of `total` negatives may be accepted at `rate` (floor, tolerant of binary rounding)."""
    return int(math.floor(rate * total + _RATE_SLACK))


def threshold_at_rate(top_negative_scores: np.ndarray, total_negatives: int, rate: float) -> tuple[float, float]:
    """(threshold t, rate reached) with t the lowest threshold accepting at most rate * total negatives.

    `top_negative_scores` must hold at least the allowed_count(rate, total) + 1 highest negative
    scores (all of them when fewer exist).
    """
    allowed = allowed_count(rate, total_negatives)
    if allowed >= total_negatives:
        return -math.inf, 1.0
    ordered = np.sort(np.asarray(top_negative_scores, dtype=np.float64))[::-1]
    if ordered.size <= allowed:
        raise IdentificationError(f"rate {rate:g} over {total_negatives} negatives needs the {allowed + 1} highest "
                                  f"negative scores, only {ordered.size} were kept")
    threshold = float(ordered[allowed])
    return threshold, float(np.count_nonzero(ordered > threshold) / total_negatives)


def mate_ranks(candidate_labels: np.ndarray, probe_labels: np.ndarray) -> np.ndarray:
    """1-based position of the first candidate with the probe's identity; 0 when none is listed."""
    hits = np.asarray(candidate_labels) == np.asarray(probe_labels)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


def mated_mask(probe_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    gallery_labels = np.asarray(gallery_labels)
    return np.isin(probe_labels, gallery_labels[gallery_labels != NO_IDENTITY])


def check_closed_set(mated: np.ndarray, probe_names: list[str] | None = None) -> None:
    """Error naming the first probe that has no mate in the gallery."""
    missing = np.flatnonzero(~mated)
    if missing.size:
        first = probe_names[missing[0]] if probe_names else f"probe {missing[0]}"
        raise IdentificationError(f"{first} has no mate in the gallery ({missing.size} of {mated.size} probes have "
                                  "none): a closed-set measure needs every probe's identity in the gallery; "
                                  "use the open-set measures (TPIR at FPIR) or add the identities to the gallery")


def cmc(ranks: np.ndarray, mated: np.ndarray, cmc_ranks: tuple[int, ...] = CMC_RANKS, *,
        listed: int | None = None) -> dict[int, float]:
    """Share of mated probes with mate rank 1..r, for each r (`listed`: candidates per probe, >= max r)."""
    if listed is not None and max(cmc_ranks) > listed:
        raise IdentificationError(f"CMC at rank {max(cmc_ranks)} needs at least that many candidates per probe, "
                                  f"the search listed {listed}")
    if not mated.any():
        raise IdentificationError("no probe has a mate in the gallery: CMC is undefined")
    mated_ranks = ranks[mated]
    return {r: float(np.mean((mated_ranks >= 1) & (mated_ranks <= r))) for r in cmc_ranks}


def tpir_at_fpir(top_scores: np.ndarray, top_is_mate: np.ndarray, mated: np.ndarray,
                 fpir_targets: tuple[float, ...] = FPIR_TARGETS) -> list[RateAtTarget]:
    """TPIR at each FPIR target from every probe's first candidate (score, whether it is a mate)."""
    nonmated_scores = np.asarray(top_scores, dtype=np.float64)[~mated]
    if not nonmated_scores.size or not mated.any():
        raise IdentificationError(f"TPIR at FPIR needs mated and non-mated probes; there are {int(mated.sum())} "
                                  f"mated and {nonmated_scores.size} non-mated")
    hits = np.asarray(top_scores, dtype=np.float64)[mated & top_is_mate]
    results = []
    for target in fpir_targets:
        threshold, reached = threshold_at_rate(nonmated_scores, nonmated_scores.size, target)
        results.append(RateAtTarget(target=float(target), rate=float(np.count_nonzero(hits > threshold) / mated.sum()),
                                    reached=reached, threshold=threshold))
    return results


def tar_at_far(genuine_scores: np.ndarray, top_impostor_scores: np.ndarray, total_impostors: int,
               far_targets: tuple[float, ...] = SEARCH_FAR_TARGETS) -> list[RateAtTarget]:
    """TAR at each FAR target, from every genuine score and the highest impostor scores (see the module docstring)."""
    genuine = np.asarray(genuine_scores, dtype=np.float64)
    if not genuine.size or not total_impostors:
        raise IdentificationError(f"TAR at FAR needs genuine and impostor pairs; there are {genuine.size} genuine and "
                                  f"{total_impostors} impostor pairs")
    results = []
    for target in far_targets:
        threshold, reached = threshold_at_rate(top_impostor_scores, total_impostors, target)
        accepted = np.count_nonzero(genuine > threshold) / genuine.size
        results.append(RateAtTarget(target=float(target), rate=float(accepted), reached=reached, threshold=threshold))
    return results


def identify(name: str, candidate_scores: np.ndarray, candidate_labels: np.ndarray, probe_labels: np.ndarray,
             mated: np.ndarray, gallery_size: int, *, cmc_ranks: tuple[int, ...] = CMC_RANKS,
             fpir_targets: tuple[float, ...] = FPIR_TARGETS, closed_set: bool = False,
             probe_names: list[str] | None = None) -> IdentificationResult:
    """CMC (and TPIR at FPIR when some probes are non-mated) from every probe's candidate list."""
    mated = np.asarray(mated, dtype=bool)
    if closed_set:
        check_closed_set(mated, probe_names)
    ranks, listed = mate_ranks(candidate_labels, probe_labels), candidate_labels.shape[1]
    result = IdentificationResult(name=name, probes=int(mated.size), mated_probes=int(mated.sum()),
                                  gallery=int(gallery_size), cmc=cmc(ranks, mated, cmc_ranks, listed=listed),
                                  cmc_curve=list(cmc(ranks, mated, tuple(range(1, listed + 1))).values()))
    if not mated.all():
        rates = tpir_at_fpir(candidate_scores[:, 0], ranks == 1, mated, fpir_targets)
        result.tpir_at_fpir = [asdict(r) for r in rates]
        result.tpir_curve = [(r.reached, r.rate) for r in tpir_at_fpir(candidate_scores[:, 0], ranks == 1, mated,
                                                                      FPIR_CURVE)]
    return result


def average_results(name: str, results: list[IdentificationResult]) -> IdentificationResult:
    """Mean of CMC and TPIR over galleries that split the identities of one probe set (IJB's G1 and G2):
    the probe count of that set, mated probes and gallery sizes summed; no thresholds."""
    first = results[0]
    if any(r.probes != first.probes for r in results):
        raise IdentificationError(f"averaging results of different probe sets ({[r.probes for r in results]} probes)")
    mean = IdentificationResult(name=name, probes=first.probes,
                                mated_probes=sum(r.mated_probes for r in results),
                                gallery=sum(r.gallery for r in results),
                                cmc={k: float(np.mean([r.cmc[k] for r in results])) for k in first.cmc},
                                cmc_curve=np.mean([r.cmc_curve for r in results], axis=0).tolist())
    if all(r.tpir_at_fpir for r in results):
        mean.tpir_at_fpir = [{key: float(np.mean([r.tpir_at_fpir[i][key] for r in results]))
                              for key in ("target", "rate", "reached")} | {"threshold": None}
                             for i in range(len(first.tpir_at_fpir))]
    return mean


def format_identification_table(results: list[IdentificationResult]) -> str:
    """One line per result: CMC at each rank and TPIR at each FPIR (percent)."""
    first = results[0]
    ranks = [f"rank-{r}" for r in first.cmc]
    fpirs = [f"TPIR@{t['target']:.0e}" for t in first.tpir_at_fpir]
    lines = [f"{'':<10}{'probes':>8}{'mated':>8}{'gallery':>9}" + "".join(f"{h:>12}" for h in ranks + fpirs)]
    for result in results:
        values = [100 * v for v in result.cmc.values()] + [100 * t["rate"] for t in result.tpir_at_fpir]
        lines.append(f"{result.name:<10}{result.probes:>8}{result.mated_probes:>8}{result.gallery:>9}"
                     + "".join(f"{v:>12.2f}" for v in values))
    return "\n".join(lines)
