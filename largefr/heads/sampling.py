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
    found = torch.zeros(0, dtype=torch.long, device=device)
    while found.numel() < k:
        missing = k - found.numel()
        # m draws out of n give n * (1 - exp(-m/n)) distinct values on average: solve for `missing` more
        draws = math.ceil(-n * math.log1p(-missing / n) * _DRAW_MARGIN) + 16
        drawn = torch.randint(n, (draws,), generator=generator, device=device)
        found = torch.unique(torch.cat([found, drawn]))
    # drop a uniform random (found - k)-subset; `found` is sorted (unique's order), so what is kept stays sorted
    keep = torch.ones(found.numel(), dtype=torch.bool, device=device)
    keep[torch.randperm(found.numel(), generator=generator, device=device)[:found.numel() - k]] = False
    return found[keep]


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
    """needles[i] in haystack (sorted), by binary search."""
    if haystack.numel() == 0:
        return torch.zeros_like(needles, dtype=torch.bool)
    places = torch.searchsorted(haystack, needles).clamp_(max=haystack.numel() - 1)
    return haystack[places] == needles
