"""Uniform random subsets whose cost follows the subset, not the set it is drawn from (Partial FC's negatives).

Partial FC keeps the positives of a batch and draws uniform random negatives among a rank's other classes.
Scoring every class with a uniform draw and taking the top k costs a pass over all of them (and a top-k
over millions of scores at ten million classes) for a sample of a tenth; here a subset of k out of n costs
O(k log k) when k is small against n:

- draw about k values in [0, n) with replacement, keep the distinct ones, and draw again until there are
  at least k; the set found is exchangeable (every value plays the same role), so
- keeping k of them chosen uniformly (dropping the others, so the sorted order stays) gives every k-subset
  of [0, n) the same probability.

A subset larger than a quarter of the set is cheaper as a permutation of all of it (`randperm(n)[:k]`).
"""
from __future__ import annotations

import math

import torch

_DENSE_FRACTION = 0.25
"""Above k/n = 1/4 a permutation of [0, n) is cheaper than drawing and de-duplicating."""
_DRAW_MARGIN = 1.02
"""Draws per expected distinct value needed: a second round is rare, and an extra draw costs little."""


def uniform_subset(n: int, k: int, *, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """k distinct values of [0, n), sorted, every k-subset equally likely (k <= n); generator None: torch's default."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct values out of {n}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if k > _DENSE_FRACTION * n:
        return torch.randperm(n, generator=generator, device=device)[:k].sort().values
    dtype = _draw_dtype(n)
    found = torch.zeros(0, dtype=dtype, device=device)
    while found.numel() < k:
        # as if none of the n values were found yet (the margin covers it; a short round draws again)
        drawn = torch.randint(n, (_draws_for(n, n, k - found.numel()),), generator=generator, device=device,
                              dtype=dtype)
        found = torch.unique(torch.cat([found, drawn]))
    return _keep_uniform(found, k, generator).long()


def _draw_dtype(n: int) -> torch.dtype:
    """Values below 2^31 are drawn and de-duplicated as int32, sorted in half the time: on CPU the same values from the
    same generator state as int64 (torch draws 32 bits for a range that fits; tests/test_sampling.py)."""
    return torch.int32 if n <= torch.iinfo(torch.int32).max else torch.long


def _keep_uniform(found: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k values of `found` (sorted), chosen uniformly: a uniform random (found - k)-subset is dropped, so what is kept
    stays sorted."""
    keep = torch.ones(found.numel(), dtype=torch.bool, device=found.device)
    keep[torch.randperm(found.numel(), generator=generator, device=found.device)[:found.numel() - k]] = False
    return found[keep]


def uniform_masked_subset(mask: torch.Tensor, excluded: torch.Tensor, available: int, k: int, *,
                          generator: torch.Generator | None, listed: torch.Tensor | None = None) -> torch.Tensor:
    """k distinct indices i with mask[i] True and i not in `excluded`, sorted, every k-subset equally likely.

    excluded: sorted, unique indices, all of them inside the mask. available: how many indices qualify (the mask's
    count less `excluded`'s), known to the caller without a pass (k <= available).
    When they are many against k (L_con's negatives among the classes seen so far, late in training), indices are
    drawn uniformly from [0, n) and the ones that do not qualify dropped, round after round, until at least k
    distinct ones are found: that set is exchangeable over the qualifying indices, so keeping k of them uniformly
    gives a uniform k-subset, for about k x n / available draws and nothing of size n. When few qualify (early in
    training) the qualifying indices are listed instead and k of them drawn: from `listed` (the sorted indices where
    the mask is True, when the caller keeps them) if that is shorter than the draws, else by a pass over the mask
    when the draws would pass a quarter of n. Both lists are the same, so both give the same subset.
    """
    n, device = mask.numel(), mask.device
    if not 0 <= k <= available:
        raise ValueError(f"cannot draw {k} distinct values out of {available}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    draws = _draws_for(n, available, k)
    if k == available or draws > _DENSE_FRACTION * n or (listed is not None and listed.numel() <= draws):
        if listed is None:
            listed = torch.nonzero(mask).squeeze(1)
        candidates = listed[~contains_sorted(excluded, listed)]
        return candidates[uniform_subset(candidates.numel(), k, generator=generator, device=device)]
    found = torch.zeros(0, dtype=torch.long, device=device)
    while found.numel() < k:
        drawn = torch.randint(n, (_draws_for(n, available - found.numel(), k - found.numel()),),
                              generator=generator, device=device)
        drawn = drawn[mask[drawn] & ~contains_sorted(excluded, drawn)]
        found = torch.unique(torch.cat([found, drawn]))
    return _keep_uniform(found, k, generator)


def _draws_for(n: int, available: int, missing: int) -> int:
    """Draws with replacement out of n that give `missing` new values among `available` unseen qualifying ones on
    average (each is hit by a draw with probability 1/n), with `_DRAW_MARGIN`."""
    if missing >= available:
        return n + 16 if available else 0
    return math.ceil(-n * math.log1p(-missing / available) * _DRAW_MARGIN) + 16


def uniform_complement_subset(n: int, excluded: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """k distinct values of [0, n) outside `excluded` (sorted, unique, inside [0, n)), sorted, uniformly.

    The j-th value not excluded is j plus the number of excluded values at or below it: found by a
    binary search over `excluded - arange`, so nothing of size n is made.
    """
    picks = uniform_subset(n - excluded.numel(), k, generator=generator, device=excluded.device)
    if excluded.numel() == 0:
        return picks
    gaps = excluded - torch.arange(excluded.numel(), device=excluded.device)
    return picks + torch.searchsorted(gaps, picks, right=True)


_ROWS_PER_INSERTION = 512
"""With at least this many values of a per value of b missing from a, the union is a's runs between those values,
joined: one copy of a and a few microseconds per run (0.3 ms for 64 values into 500,000 where the masks below take
2.8 ms; at about one per 500 the masks win)."""


def union_of_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sorted union of two sorted, unique 1-D tensors, in O(len(a) + len(b) log len(a)) without a sort: the
    rows a step touches (Partial FC's sample and L_ali's few classes; the sample's negatives and positives)."""
    extra = b[~contains_sorted(a, b)]
    if extra.numel() == 0:
        return a
    if extra.numel() * _ROWS_PER_INSERTION <= a.numel():
        return _insert_sorted(a, extra)
    # each value's place in the union: its own index plus how many of the other tensor's values come before it
    union = torch.empty(a.numel() + extra.numel(), dtype=a.dtype, device=a.device)
    extra_places = torch.searchsorted(a, extra) + torch.arange(extra.numel(), device=a.device)
    from_a = torch.ones(union.numel(), dtype=torch.bool, device=a.device)
    from_a[extra_places] = False
    union[extra_places] = extra
    union[from_a] = a
    return union


def _insert_sorted(a: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """`a` with the sorted values `extra` (none of them in `a`) put in their places: a's runs between them, joined
    (one copy of `a`, no pass over a mask of the union's size)."""
    places = torch.searchsorted(a, extra).tolist()
    pieces, start = [], 0
    for index, place in enumerate(places):
        pieces += [a[start:place], extra[index:index + 1]]
        start = place
    pieces.append(a[start:])
    return torch.cat(pieces)


def contains_sorted(haystack: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """needles[i] in haystack (sorted, unique), by binary search."""
    return position_in_sorted(haystack, needles) >= 0


def position_in_sorted(haystack: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """The index of needles[i] in haystack (sorted, unique), -1 where it is not there, by binary search."""
    if haystack.numel() == 0:
        return torch.full_like(needles, -1, dtype=torch.long)
    places = torch.searchsorted(haystack, needles).clamp_(max=haystack.numel() - 1)
    return torch.where(haystack[places] == needles, places, -1)
