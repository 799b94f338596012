"""sharded_cross_entropy and the feature all-gather against a dense float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from largefr.distributed.collectives import all_gather_with_grad
from largefr.distributed.cross_entropy import sharded_cross_entropy
from largefr.distributed.partition import ClassPartition
from tests.distributed_helpers import run_distributed

ROWS, CLASSES = 13, 1001


def dense_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, CLASSES, generator=gen, dtype=torch.float64) * 5
    target = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    target[3] = -100  # a row whose positive lives on no rank
    return logits, target


def _sharded_rank(rank, world, seed):
    logits, target = dense_problem(seed)
    part = ClassPartition(CLASSES, world, rank)
    local = logits[:, part.start:part.end].clone().requires_grad_(True)
    inside = (target >= part.start) & (target < part.end)
    local_target = torch.where(inside, target - part.start, torch.full_like(target, -1))
    loss = sharded_cross_entropy(local, local_target, group=None)
    loss.backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_dense_cross_entropy(world):
    logits, target = dense_problem(seed=world)
    dense = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(dense, target, ignore_index=-100)
    expected.backward()
    results = run_distributed(_sharded_rank, world, world)
    for rank, (loss, grad) in enumerate(results):
        part = ClassPartition(CLASSES, world, rank)
        assert abs(loss.item() - expected.item()) < 1e-10
        torch.testing.assert_close(grad, dense.grad[:, part.start:part.end], atol=1e-10, rtol=0)


def _gather_rank(rank, world):
    gen = torch.Generator().manual_seed(rank)
    local = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(local, group=None)
    # a loss computed from rank-specific columns: the summed backward must be the full gradient
    weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered) * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), local.grad


@pytest.mark.parametrize("world", [1, 3])
def test_all_gather_backward_sums_rank_gradients(world):
    results = run_distributed(_gather_rank, world)
    expected_rows = torch.cat([torch.randn(3, 4, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                               for r in range(world)])
    base = torch.arange(expected_rows.numel(), dtype=torch.float64).view_as(expected_rows)
    total_scale = sum(r + 1 for r in range(world))
    for rank, (gathered, grad) in enumerate(results):
        torch.testing.assert_close(gathered, expected_rows)
        torch.testing.assert_close(grad, base[rank * 3:(rank + 1) * 3] * total_scale)


def test_partition_covers_uneven_classes():
    for world in range(1, 5):
        ranges = ClassPartition(1001, world, 0).all_ranges()
        assert ranges[0][0] == 0 and ranges[-1][1] == 1001
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
        for cls in (0, 500, 1000):
            owner = ClassPartition(1001, world, 0).owner_of(cls)
            assert ClassPartition(1001, world, owner).owns(cls)


def test_partition_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError, match="num_classes \\(3\\) < world size \\(4\\)"):
        ClassPartition(3, 4, 0)
