"""Partial FC's negatives: uniform k-subsets drawn at a cost that follows k (largefr.heads.sampling)."""
import itertools
import math
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from largefr.heads.sampling import (_draws_for, uniform_complement_subset, uniform_masked_subset, uniform_subset,
                                    union_of_sorted)

DRAWS = 12_000


def chi_square(counts: Counter, outcomes: list, draws: int) -> float:
    expected = draws / len(outcomes)
    return sum((counts[o] - expected) ** 2 / expected for o in outcomes)


def chi_square_bound(outcomes: int) -> float:
    """Mean + 6 standard deviations of a chi-square with outcomes - 1 degrees of freedom (p far below 1e-6)."""
    dof = outcomes - 1
    return dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("n,k", [(13, 2), (9, 4)])  # k/n 0.15: draw and de-duplicate; 0.44: a permutation
def test_every_subset_is_equally_likely(n, k):
    generator = torch.Generator().manual_seed(0)
    counts = Counter(tuple(uniform_subset(n, k, generator=generator, device="cpu").tolist()) for _ in range(DRAWS))
    subsets = list(itertools.combinations(range(n), k))
    assert set(counts) <= set(subsets)  # sorted, distinct, inside [0, n)
    assert chi_square(counts, subsets, DRAWS) < chi_square_bound(len(subsets))


def test_a_biased_draw_fails_the_uniformity_check():
    """The check above can fail: the k smallest of k+1 uniform draws (a plausible shortcut) favours small values."""
    generator = torch.Generator().manual_seed(0)
    counts = Counter(tuple(torch.unique(torch.randint(13, (3,), generator=generator))[:2].tolist())
                     for _ in range(DRAWS))
    subsets = list(itertools.combinations(range(13), 2))
    assert chi_square(counts, subsets, DRAWS) > chi_square_bound(len(subsets))


def test_complement_avoids_the_excluded_and_is_uniform_over_the_rest():
    n, k = 40, 3
    excluded = torch.tensor([0, 1, 7, 8, 9, 20, 39])
    rest = sorted(set(range(n)) - set(excluded.tolist()))
    generator = torch.Generator().manual_seed(1)
    hits = Counter()
    for _ in range(DRAWS):
        picks = uniform_complement_subset(n, excluded, k, generator=generator)
        assert picks.numel() == k and bool((picks[1:] > picks[:-1]).all())
        hits.update(picks.tolist())
    assert set(hits) <= set(rest)
    # each of the 33 allowed values is in a subset with probability k / 33: its count is binomial
    expected = DRAWS * k / len(rest)
    sigma = math.sqrt(DRAWS * k / len(rest) * (1 - k / len(rest)))
    assert all(abs(hits[v] - expected) < 6 * sigma for v in rest), hits


@pytest.mark.parametrize("n,listed", [(40, False), (4000, False), (4000, True)])
def test_masked_subset_is_uniform_over_the_qualifying_indices(n, listed):
    """L_con's negatives: k of the indices inside the mask and outside `excluded`, every k-subset equally likely,
    whether they are listed by a pass (11 allowed of 40), found by drawing from [0, n) and dropping the rest (of
    4000), or taken from the caller's list of the mask's indices (the bank's seen rows, while few)."""
    generator = torch.Generator().manual_seed(n)
    inside = torch.randperm(n, generator=generator)[:14].sort().values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[inside] = True
    excluded = inside[torch.tensor([0, 4, 9])]
    allowed = [v for v in inside.tolist() if v not in excluded.tolist()]
    k = 2
    assert (_draws_for(n, len(allowed), k) > n / 4) == (n == 40)  # each way of finding them is tested
    counts = Counter(tuple(uniform_masked_subset(mask, excluded, len(allowed), k, generator=generator,
                                                 listed=inside if listed else None).tolist())
                     for _ in range(DRAWS))
    subsets = list(itertools.combinations(allowed, k))
    assert set(counts) <= set(subsets)  # sorted, distinct, qualifying
    assert chi_square(counts, subsets, DRAWS) < chi_square_bound(len(subsets))


def test_a_listed_mask_gives_the_subset_of_a_pass_over_it():
    """Where a pass over the mask would list the qualifying indices, the caller's list gives the same subset from the
    same generator state (so keeping the list changes no run's draws there), and it is taken even where drawing
    would be the way without it, once it is shorter than the draws."""
    n, k = 1000, 10
    generator = torch.Generator().manual_seed(8)
    inside = torch.randperm(n, generator=generator)[:40].sort().values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[inside] = True
    excluded = inside[::9].contiguous()
    allowed = inside[~torch.isin(inside, excluded)]
    assert _draws_for(n, allowed.numel(), k) > n / 4  # the pass is the way without a list
    state = generator.get_state()
    by_pass = uniform_masked_subset(mask, excluded, allowed.numel(), k, generator=generator)
    generator.set_state(state)
    assert torch.equal(uniform_masked_subset(mask, excluded, allowed.numel(), k, generator=generator, listed=inside),
                       by_pass)
    wide, k = 100_000, 2
    mask = torch.zeros(wide, dtype=torch.bool)
    mask[inside * 100] = True
    assert _draws_for(wide, allowed.numel(), k) < wide / 4  # drawing is the way without a list...
    generator.set_state(state)
    drawn = uniform_masked_subset(mask, excluded * 100, allowed.numel(), k, generator=generator)
    generator.set_state(state)
    listed = uniform_masked_subset(mask, excluded * 100, allowed.numel(), k, generator=generator, listed=inside * 100)
    generator.set_state(state)
    expected = allowed[uniform_subset(allowed.numel(), k, generator=generator, device="cpu")] * 100
    assert torch.equal(listed, expected) and not torch.equal(drawn, listed)  # ...and the list is taken


def test_int32_draws_are_the_int64_draws():
    """uniform_subset draws values below 2^31 as int32 to sort them faster: torch gives the same values and leaves
    the generator in the same state, so runs (and resumed checkpoints) draw the same samples as with int64."""
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(torch.randint(5_000_000, (10_000,), generator=first, dtype=torch.int32).long(),
                       torch.randint(5_000_000, (10_000,), generator=second))
    assert torch.equal(first.get_state(), second.get_state())


def test_masked_subset_draws_when_most_qualify_and_makes_nothing_of_the_mask_size():
    """Late in training (nearly every class seen) the negatives cost what is drawn: nothing of the mask's length
    (a list of the qualifying indices would be 8 bytes each)."""
    n, k = 2_000_000, 1000
    mask = torch.ones(n, dtype=torch.bool)
    mask[::7] = False
    excluded = torch.tensor([1, 2, 3, 500_000])
    generator = torch.Generator().manual_seed(3)
    available = int(mask.sum()) - excluded.numel()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        picks = uniform_masked_subset(mask, excluded, available, k, generator=generator)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    assert max(sizes) < n // 16, max(sizes)
    assert picks.numel() == k and bool((picks[1:] > picks[:-1]).all())
    assert bool(mask[picks].all()) and not bool(torch.isin(picks, excluded).any())


def test_edges_and_large_sets():
    generator = torch.Generator().manual_seed(2)
    assert uniform_subset(5, 0, generator=generator, device="cpu").numel() == 0
    assert torch.equal(uniform_subset(5, 5, generator=generator, device="cpu"), torch.arange(5))
    assert torch.equal(uniform_complement_subset(6, torch.tensor([1, 4]), 4, generator=generator),
                       torch.tensor([0, 2, 3, 5]))
    big = uniform_complement_subset(10_000_000, torch.tensor([3, 5_000_000]), 50_000, generator=generator)
    assert big.numel() == 50_000 and bool((big[1:] > big[:-1]).all())
    assert not bool(torch.isin(big, torch.tensor([3, 5_000_000])).any())
    with pytest.raises(ValueError, match="cannot draw 6 distinct values out of 5"):
        uniform_subset(5, 6, generator=generator, device="cpu")


@pytest.mark.parametrize("universe, seed, sizes", [
    (300, 3, ((0, 4), (5, 0), (50, 7), (7, 50), (200, 200))),
    # a few values of b outside a large a are put in by joining a's runs, many by masks: the same union
    (40_000, 4, ((20_000, 30), (19_000, 3), (3000, 9000), (9000, 3000), (0, 6000)))], ids=["small", "runs_and_masks"])
def test_union_of_sorted_equals_unique_of_both(universe, seed, sizes):
    generator = torch.Generator().manual_seed(seed)
    for size_a, size_b in sizes:
        a = torch.randperm(universe, generator=generator)[:size_a].sort().values
        b = torch.randperm(universe, generator=generator)[:size_b].sort().values
        assert torch.equal(union_of_sorted(a, b), torch.unique(torch.cat([a, b])))
    assert torch.equal(union_of_sorted(torch.tensor([1, 5, 9]), torch.tensor([5])), torch.tensor([1, 5, 9]))
