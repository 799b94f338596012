"""Exact top-k search of a large gallery, streamed in blocks and sharded across ranks.

Every rank owns a contiguous share of the gallery rows (`largefr.eval.verification.share_range`),
reads it `block_rows` rows at a time, scores the probes against the block (`probe_rows` probes at a
time), and keeps per probe the k best (score, gallery index) pairs, ordered by score then by lower
index (the candidate-list order of `largefr.eval.identification`); the partial lists of the ranks are
then gathered and merged the same way (a k-way merge), which yields exactly the candidate lists of
one dense sort. Alongside, each rank keeps every genuine pair score (probe and gallery entry of the
same identity) and only the highest impostor scores that TAR at the smallest FAR needs, so memory
is bounded by the block: about 4 * probe_rows * block_rows bytes of scores plus 4 * block_rows * d
of gallery rows, however large the gallery.

Gallery rows come from `GallerySource`s: an array (a memory-mapped .npy reads only the share) or
`RandomDistractors`, random unit vectors generated chunk by chunk from (seed, chunk number), so a
row's value does not depend on the block size, the shard or the world size.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_gather_rows, all_gather_variable_rows, all_reduce_sum_, group_rank, \
    group_size
from largefr.errors import UserError
from largefr.eval.identification import (CMC_RANKS, FPIR_TARGETS, NO_IDENTITY, SEARCH_FAR_TARGETS, IdentificationResult,
                                         allowed_count, format_identification_table, identify, tar_at_far)
from largefr.eval.verification import share_range

DISTRACTOR_CHUNK_ROWS = 4096
"""Rows of `RandomDistractors` generated from one seed; fixed so that rows never depend on blocks."""
MAX_KEPT_IMPOSTORS = 1 << 24
"""Impostor scores a rank may keep for TAR at FAR (64 MiB of float32)."""


class SearchError(UserError, ValueError):
    """Probes, gallery or settings that the search cannot work with."""


class GallerySource(Protocol):
    rows: int
    dim: int

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end) as float32."""

    def labels(self, start: int, end: int) -> np.ndarray:
        """Identity labels (int64) of rows [start, end)."""


@dataclass
class ArraySource:
    """Rows of an array (a memory-mapped .npy is read only where asked); labels default to NO_IDENTITY."""

    embeddings: np.ndarray
    identity: np.ndarray | None = None
    name: str = "gallery"

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2:
            raise SearchError(f"{self.name}: expected a 2-D array of embeddings, got shape {self.embeddings.shape}")
        if self.identity is not None and len(self.identity) != len(self.embeddings):
            raise SearchError(f"{self.name}: {len(self.embeddings)} embeddings but {len(self.identity)} labels")
        self.rows, self.dim = self.embeddings.shape

    def read(self, start: int, end: int) -> np.ndarray:
        return np.array(self.embeddings[start:end], dtype=np.float32)  # a writable copy of the block only

    def labels(self, start: int, end: int) -> np.ndarray:
        if self.identity is None:
            return np.full(end - start, NO_IDENTITY, dtype=np.int64)
        return np.asarray(self.identity[start:end], dtype=np.int64)


@dataclass
class RandomDistractors:
    """`rows` random unit vectors of size `dim` (normal entries, L2-normalized), no identity."""

    rows: int
    dim: int
    seed: int = 0

    def _chunk(self, number: int) -> np.ndarray:
        count = min(DISTRACTOR_CHUNK_ROWS, self.rows - number * DISTRACTOR_CHUNK_ROWS)
        values = np.random.default_rng([self.seed, number]).standard_normal((count, self.dim), dtype=np.float32)
        return values / np.linalg.norm(values, axis=1, keepdims=True)

    def read(self, start: int, end: int) -> np.ndarray:
        rows = np.empty((max(0, end - start), self.dim), dtype=np.float32)
        for number in range(start // DISTRACTOR_CHUNK_ROWS, (end - 1) // DISTRACTOR_CHUNK_ROWS + 1):
            chunk_start = number * DISTRACTOR_CHUNK_ROWS
            lo, hi = max(start, chunk_start), min(end, chunk_start + DISTRACTOR_CHUNK_ROWS)
            rows[lo - start:hi - start] = self._chunk(number)[lo - chunk_start:hi - chunk_start]
        return rows

    def labels(self, start: int, end: int) -> np.ndarray:
        return np.full(end - start, NO_IDENTITY, dtype=np.int64)


class ConcatSource:
    """Sources one after the other in one index space (e.g. the labelled gallery, then distractors)."""

    def __init__(self, sources: list[GallerySource]) -> None:
        dims = {s.dim for s in sources}
        if len(dims) != 1:
            raise SearchError(f"gallery sources have different embedding sizes {sorted(dims)}; all must match")
        self.sources, self.dim = sources, dims.pop()
        self.starts = np.cumsum([0] + [s.rows for s in sources])
        self.rows = int(self.starts[-1])

    def _pieces(self, start: int, end: int):
        for source, lo in zip(self.sources, self.starts[:-1]):
            a, b = max(start, lo), min(end, lo + source.rows)
            if a < b:
                yield source, int(a - lo), int(b - lo)

    def read(self, start: int, end: int) -> np.ndarray:
        parts = [s.read(a, b) for s, a, b in self._pieces(start, end)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)

    def labels(self, start: int, end: int) -> np.ndarray:
        parts = [s.labels(a, b) for s, a, b in self._pieces(start, end)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _lexicographic_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns per row by (value descending, index ascending)."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), indices.gather(1, by_value)


def _crowded_rows_topk(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k best per row when more columns tie at the k-th value than places: lowest first."""
    take = scores > kth
    tied = scores == kth
    tied &= tied.cumsum(dim=1) <= k - take.sum(dim=1, keepdim=True)
    return (take | tied).nonzero()[:, 1].view(scores.shape[0], k)


def block_topk(scores: torch.Tensor, k: int, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a score block (columns = gallery rows first_index...), ties to the lower index."""
    k = min(k, scores.shape[1])
    values, columns = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    if values.shape[1] > k:  # a (k+1)-th value equal to the k-th: topk's choice among the tied is arbitrary
        crowded = torch.nonzero(values[:, k] == values[:, k - 1]).view(-1)
        values, columns = values[:, :k], columns[:, :k].clone()
        if crowded.numel():
            columns[crowded] = _crowded_rows_topk(scores[crowded], values[crowded, k - 1:], k)
            values = scores.gather(1, columns)
    return _lexicographic_topk(values, columns + first_index, k)


def merge_topk(values: torch.Tensor, indices: torch.Tensor, more_values: torch.Tensor, more_indices: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two candidate lists per row into the k best (padding entries carry -inf and index -1)."""
    return _lexicographic_topk(torch.cat([values, more_values], 1), torch.cat([indices, more_indices], 1), k)


@dataclass(kw_only=True)
class SearchResult:
    """Same on every rank after `sharded_search`."""

    scores: np.ndarray
    """Q x k candidate scores, best first (-inf pads lists of galleries smaller than k)."""
    indices: np.ndarray
    """Q x k gallery indices of the candidates (-1 for padding)."""
    labels: np.ndarray
    """Q x k identity labels of the candidates."""
    genuine_scores: np.ndarray
    """Scores of every (probe, gallery entry of its identity) pair."""
    genuine_per_probe: np.ndarray
    """Q gallery entries of each probe's identity (0: a non-mated probe)."""
    top_impostor_scores: np.ndarray
    """The highest impostor pair scores, at least as many as TAR at the largest FAR target needs."""
    impostor_pairs: int
    gallery_rows: int
    seconds: float


@dataclass
class _ShardState:
    values: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor
    genuine: list[torch.Tensor]
    genuine_per_probe: torch.Tensor
    impostors: torch.Tensor
    impostor_pairs: int = 0


def _keep_highest(kept: torch.Tensor, block_impostors: torch.Tensor, keep: int) -> torch.Tensor:
    merged = torch.cat([kept, block_impostors])
    return torch.topk(merged, keep).values if merged.numel() > keep else merged


def _block_floor(scores: torch.Tensor, keep: int) -> float:
    """A score at or below the keep-th highest of the block: the keep-th highest of the rows' top shares."""
    per_row = -(-keep // scores.shape[0])
    if per_row >= scores.shape[1]:
        return -math.inf
    best = torch.topk(scores, per_row, dim=1).values.flatten()  # >= keep real scores of the block
    return float(torch.topk(best, keep).values[-1])


def _update_impostors(state: _ShardState, scores: torch.Tensor, genuine_rows: torch.Tensor,
                      genuine_columns: torch.Tensor, keep: int) -> None:
    """Merge the block's impostor scores into the kept highest ones, copying only those that can enter."""
    genuine_values = scores[genuine_rows, genuine_columns]
    scores[genuine_rows, genuine_columns] = -math.inf  # out of the impostors for a moment
    floor = float(state.impostors.min()) if state.impostors.numel() >= keep else _block_floor(scores, keep)
    entering = scores >= floor if floor > -math.inf else scores > floor
    state.impostors = _keep_highest(state.impostors, scores[entering], keep)
    scores[genuine_rows, genuine_columns] = genuine_values


def genuine_pairs(probe_labels: torch.Tensor, block_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe rows, block columns) of every same-identity pair, by a sorted join of the labels (no Q x B mask)."""
    order = torch.argsort(block_labels)
    ordered = block_labels[order]
    first = torch.searchsorted(ordered, probe_labels, side="left")
    counts = torch.searchsorted(ordered, probe_labels, side="right") - first
    rows = torch.repeat_interleave(torch.arange(len(probe_labels), device=counts.device), counts)
    within = torch.arange(len(rows), device=counts.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return rows, order[torch.repeat_interleave(first, counts) + within]


def _score_block(state: _ShardState, probes: torch.Tensor, probe_labels: torch.Tensor, block: torch.Tensor,
                 block_labels: torch.Tensor, first_index: int, k: int, keep: int, probe_rows: int) -> None:
    for lo in range(0, probes.shape[0], probe_rows):
        rows = slice(lo, lo + probe_rows)
        scores = probes[rows] @ block.T
        genuine_rows, genuine_columns = genuine_pairs(probe_labels[rows], block_labels)
        state.genuine.append(scores[genuine_rows, genuine_columns])
        state.genuine_per_probe[rows] += torch.bincount(genuine_rows, minlength=scores.shape[0])
        state.impostor_pairs += scores.numel() - len(genuine_rows)
        if keep:
            _update_impostors(state, scores, genuine_rows, genuine_columns, keep)
        values, indices = block_topk(scores, k, first_index)
        merged_values, merged_indices = merge_topk(state.values[rows], state.indices[rows], values, indices, k)
        merged_labels = torch.cat([state.labels[rows], block_labels[indices - first_index]], 1)
        order = torch.cat([state.indices[rows], indices], 1)
        state.labels[rows] = merged_labels.gather(1, _positions(order, merged_indices))
        state.values[rows], state.indices[rows] = merged_values, merged_indices


def _positions(pool: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Column in `pool` of each chosen index (indices are unique per row, padding -1 maps to a padding column)."""
    return (pool[:, None, :] == chosen[:, :, None]).int().argmax(dim=2)


def check_embeddings(probes: np.ndarray, probe_labels: np.ndarray, source: GallerySource) -> None:
    if probes.ndim != 2:
        raise SearchError(f"probes: expected a 2-D array of embeddings, got shape {probes.shape}")
    if probes.shape[1] != source.dim:
        raise SearchError(f"probe embeddings have size {probes.shape[1]} but gallery embeddings {source.dim}: "
                          "embed both with the same model")
    if not np.isfinite(probes).all():
        raise SearchError(f"probe {int(np.flatnonzero(~np.isfinite(probes).all(axis=1))[0])} has a NaN or "
                          "infinite embedding")
    if np.any(probe_labels == NO_IDENTITY):
        raise SearchError(f"probe {int(np.flatnonzero(probe_labels == NO_IDENTITY)[0])} has label {NO_IDENTITY}, "
                          "the label of distractors; give probes labels >= 0")


def impostors_to_keep(probes: int, gallery_rows: int, far_targets: tuple[float, ...]) -> int:
    """How many of the highest impostor scores TAR at the largest FAR target needs (an upper bound)."""
    keep = allowed_count(max(far_targets), probes * gallery_rows) + 1 if far_targets else 0
    if keep > MAX_KEPT_IMPOSTORS:
        raise SearchError(f"TAR at FAR {max(far_targets):g} over up to {probes * gallery_rows} impostor pairs needs "
                          f"the {keep} highest impostor scores per rank (over {MAX_KEPT_IMPOSTORS}); ask for "
                          "smaller FAR targets (MegaFace reports 1e-6)")
    return keep


def search_shard(probes: torch.Tensor, probe_labels: torch.Tensor, source: GallerySource, start: int, end: int, *,
                 k: int, keep: int, block_rows: int, probe_rows: int, progress_every: float = 0.0,
                 device: torch.device | str = "cpu", name: str = "search") -> _ShardState:
    """Candidate lists, genuine scores and highest impostor scores of gallery rows [start, end)."""
    state = _ShardState(values=torch.full((probes.shape[0], k), -math.inf, device=device),
                        indices=torch.full((probes.shape[0], k), -1, dtype=torch.int64, device=device),
                        labels=torch.full((probes.shape[0], k), NO_IDENTITY, dtype=torch.int64, device=device),
                        genuine=[], genuine_per_probe=torch.zeros(probes.shape[0], dtype=torch.int64, device=device),
                        impostors=torch.zeros(0, device=device))
    started = last_report = time.perf_counter()
    for first in range(start, end, block_rows):
        last = min(first + block_rows, end)
        block = torch.from_numpy(source.read(first, last)).to(device)
        if not torch.isfinite(block.sum(dim=1)).all() and not torch.isfinite(block).all():  # row sums: cheap
            bad = first + int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0])
            raise SearchError(f"gallery row {bad} has a NaN or infinite embedding")
        block_labels = torch.from_numpy(source.labels(first, last)).to(device)
        _score_block(state, probes, probe_labels, block, block_labels, first, k, keep, probe_rows)
        now = time.perf_counter()
        if progress_every and (now - last_report >= progress_every or last == end):
            done = last - start
            print(f"{name}: gallery rows {done}/{end - start} of [{start}, {end}), {now - started:.1f} s, "
                  f"{done / max(now - started, 1e-9):.0f} rows/s", flush=True)
            last_report = now
    return state


def _gather_impostors(kept: torch.Tensor, keep: int, group: ProcessGroup | None) -> torch.Tensor:
    merged = all_gather_variable_rows(kept, group)
    return torch.topk(merged, min(keep, merged.numel())).values if merged.numel() > keep else merged


def sharded_search(probes: np.ndarray, probe_labels: np.ndarray, source: GallerySource, *, k: int = 10,
                   far_targets: tuple[float, ...] = SEARCH_FAR_TARGETS, block_rows: int = 65536,
                   probe_rows: int = 1024, device: torch.device | str = "cpu", group: ProcessGroup | None = None,
                   progress_every: float = 0.0) -> SearchResult:
    """Exact candidate lists of every probe over the whole gallery, this rank searching its share."""
    check_embeddings(probes, np.asarray(probe_labels), source)
    started = time.perf_counter()
    world, rank = group_size(group), group_rank(group)
    start, end = share_range(source.rows, world, rank)
    keep = impostors_to_keep(len(probes), source.rows, far_targets)
    state = search_shard(torch.from_numpy(np.array(probes, dtype=np.float32)).to(device),
                         torch.as_tensor(np.asarray(probe_labels, dtype=np.int64), device=device), source, start, end,
                         k=k, keep=keep, block_rows=block_rows, probe_rows=probe_rows,
                         progress_every=progress_every, device=device, name=f"search rank {rank}/{world}")
    values, indices, labels = (all_gather_rows(t.unsqueeze(0), group) for t in (state.values, state.indices,
                                                                                  state.labels))
    merged_values, merged_indices = values[0], indices[0]
    merged_labels = labels[0]
    for r in range(1, world):
        pool_labels = torch.cat([merged_labels, labels[r]], 1)
        pool_indices = torch.cat([merged_indices, indices[r]], 1)
        merged_values, merged_indices = merge_topk(merged_values, merged_indices, values[r], indices[r], k)
        merged_labels = pool_labels.gather(1, _positions(pool_indices, merged_indices))
    genuine = torch.cat(state.genuine) if state.genuine else torch.zeros(0, device=device)
    pairs = torch.tensor([state.impostor_pairs], dtype=torch.int64, device=device)
    return SearchResult(scores=merged_values.cpu().numpy(), indices=merged_indices.cpu().numpy(),
                        labels=merged_labels.cpu().numpy(),
                        genuine_scores=all_gather_variable_rows(genuine, group).cpu().numpy(),
                        genuine_per_probe=all_reduce_sum_(state.genuine_per_probe, group).cpu().numpy(),
                        top_impostor_scores=_gather_impostors(state.impostors, keep, group).cpu().numpy(),
                        impostor_pairs=int(all_reduce_sum_(pairs, group).item()), gallery_rows=source.rows,
                        seconds=time.perf_counter() - started)


@dataclass(kw_only=True)
class SearchReport:
    identification: IdentificationResult
    tar_at_far: list[dict]
    """One {target, rate, reached, threshold} per FAR target (MegaFace's verification measure)."""
    genuine_pairs: int
    impostor_pairs: int
    gallery_rows: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def search_report(result: SearchResult, probe_labels: np.ndarray, *, name: str = "search",
                  cmc_ranks: tuple[int, ...] = CMC_RANKS, fpir_targets: tuple[float, ...] = FPIR_TARGETS,
                  far_targets: tuple[float, ...] = SEARCH_FAR_TARGETS, closed_set: bool = False) -> SearchReport:
    """CMC (rank-1 with distractors), TPIR at FPIR when some probes are non-mated, and TAR at FAR."""
    identification = identify(name, result.scores, result.labels, probe_labels, result.genuine_per_probe > 0,
                              result.gallery_rows, cmc_ranks=cmc_ranks, fpir_targets=fpir_targets,
                              closed_set=closed_set)
    rates = tar_at_far(result.genuine_scores, result.top_impostor_scores, result.impostor_pairs, far_targets)
    return SearchReport(identification=identification, tar_at_far=[asdict(r) for r in rates],
                        genuine_pairs=int(result.genuine_scores.size), impostor_pairs=result.impostor_pairs,
                        gallery_rows=result.gallery_rows, seconds=result.seconds)


def format_search_report(report: SearchReport) -> str:
    rates = "  ".join(f"TAR@FAR={t['target']:.0e} {100 * t['rate']:.2f}%" for t in report.tar_at_far)
    return "\n".join([format_identification_table([report.identification]),
                      f"{report.genuine_pairs} genuine / {report.impostor_pairs} impostor pairs: {rates}"])
