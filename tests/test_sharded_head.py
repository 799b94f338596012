"""ShardedMarginHead on real gloo groups against a dense float64 single-process reference."""
import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import ShardedMarginHead, normal_rows
from largefr.heads.sharded_head import ROWS_PER_INIT_CHUNK
from largefr.stateful import RestoreContext
from tests.distributed_helpers import run_distributed

CLASSES, DIM, LOCAL_BATCH, SEED = 1001, 16, 6, 1234
MARGINS = {
    "arcface": HeadConfig(type="arcface", scale=30.0, margin=0.5),
    "cosface": HeadConfig(type="cosface", scale=30.0, margin=0.35),
    "combined": HeadConfig(type="combined", scale=30.0, combined_margins=(1.1, 0.3, 0.2)),
}
CASES = [(name, rate, with_lambda) for name in MARGINS for rate in (1.0, 0.3) for with_lambda in (False, True)]


def case_data(world: int, case_seed: int, classes: int = CLASSES):
    """Global batch: labels with a repeat and an ignored row, embeddings, optional per-class lambda."""
    gen = torch.Generator().manual_seed(case_seed)
    batch = world * LOCAL_BATCH
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[1] = labels[0]
    labels[-1] = -1
    embeddings = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    weight = normal_rows(0, classes, DIM, std=0.01, seed=SEED, dtype=torch.float64)
    # rows pointing away from their class centre: theta + m > pi exercises the fallback branch
    for row in (2, batch - 2):
        embeddings[row] = -weight[labels[row]] * 100 + 0.05 * torch.randn(DIM, generator=gen, dtype=torch.float64)
    class_lambda = torch.rand(classes, generator=gen, dtype=torch.float64)
    return labels, embeddings, class_lambda


def build_head(margin: HeadConfig, rate: float, group=None, classes: int = CLASSES) -> ShardedMarginHead:
    return ShardedMarginHead(classes, DIM, margin=margin, sample_rate=rate, group=group, dtype=torch.float64,
                             logits_dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))


def run_case(head, labels, embeddings, class_lambda, rank):
    """One forward/backward on this rank; everything the reference needs comes back."""
    part = head.partition
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = embeddings[rows].clone().requires_grad_(True)
    lam = None if class_lambda is None else class_lambda[part.start:part.end]
    loss = head(local, labels[rows], lam)
    loss.backward()
    grad = head.weight.grad
    return dict(loss=loss.detach(), embedding_grad=local.grad, weight=head.weight.detach().clone(),
                weight_grad=grad.to_dense(), sampled=head.last_sampled + part.start,
                grad_rows=grad.coalesce().indices()[0] if grad.is_sparse else None)


def _all_cases_rank(rank, world):
    results = []
    for index, (name, rate, with_lambda) in enumerate(CASES):
        labels, embeddings, class_lambda = case_data(world, 100 * world + index)
        head = build_head(MARGINS[name], rate)
        results.append(run_case(head, labels, embeddings, class_lambda if with_lambda else None, rank))
    two_groups = _two_groups_case(rank) if world == 4 else None
    largest = largest_allocation(world, rank) if world == 2 else None  # the profiler costs ~2 s per rank
    return dict(cases=results, largest=largest, two_groups=two_groups)


@functools.lru_cache(maxsize=None)
def job_results(world: int) -> list:
    """Every distributed case of one world size, from ONE spawned job (spawning dominates the runtime)."""
    return run_distributed(_all_cases_rank, world)


def largest_allocation(world, rank) -> int:
    """Bytes of the largest single allocation of one forward/backward (torch's CPU memory profiler)."""
    labels, embeddings, _ = case_data(world, 7)
    head = build_head(MARGINS["arcface"], 1.0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_case(head, labels, embeddings, None, rank)
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def plain_target_cos(cos, name, cfg, lam):
    """Margin written from the formulas with acos: cos(m1*theta + m2) - m3, th/mm fallback past pi."""
    m1, m2, m3 = (1.0, cfg.margin * lam, 0.0 * lam) if name == "arcface" else \
        (1.0, 0.0 * lam, cfg.margin * lam) if name == "cosface" else \
        (cfg.combined_margins[0], cfg.combined_margins[1] * lam, cfg.combined_margins[2] * lam)
    theta = torch.acos(cos)
    switch = (math.pi - m2) / m1
    fallback = cos - (math.pi - switch) * torch.sin(switch) - m3
    return torch.where(m1 * theta + m2 <= math.pi, torch.cos(m1 * theta + m2) - m3, fallback)


def dense_reference(name, labels, embeddings, weight, sampled, class_lambda):
    """Loss and gradients on the full batch and full W, restricted to the same sampled classes."""
    cfg = MARGINS[name]
    embeddings = embeddings.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight[sampled], dim=1).t()
    valid = torch.nonzero(labels >= 0).squeeze(1)
    column = torch.searchsorted(sampled, labels[valid])
    assert torch.equal(sampled[column], labels[valid]), "a positive is missing from the sampled classes"
    lam = torch.ones(len(valid), dtype=torch.float64) if class_lambda is None else class_lambda[labels[valid]]
    target = plain_target_cos(cos[valid, column], name, cfg, lam)
    logits = (cfg.scale * cos).index_put((valid, column), cfg.scale * target)
    target_index = torch.full_like(labels, -100).index_put((valid,), column)
    loss = F.cross_entropy(logits, target_index, ignore_index=-100)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def check_against_reference(world, result_per_rank, name, rate, labels, embeddings, class_lambda, classes=CLASSES):
    weight = torch.cat([r["weight"] for r in result_per_rank])
    sampled = torch.cat([r["sampled"] for r in result_per_rank])
    torch.testing.assert_close(weight, normal_rows(0, classes, DIM, std=0.01, seed=SEED, dtype=torch.float64),
                               atol=0, rtol=0)
    loss, embedding_grad, weight_grad = dense_reference(name, labels, embeddings, weight, sampled, class_lambda)
    for rank, result in enumerate(result_per_rank):
        part = ClassPartition(classes, world, rank)
        assert abs(result["loss"].item() - loss.item()) < 1e-10, (rank, result["loss"].item(), loss.item())
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["embedding_grad"], embedding_grad[rows], atol=1e-10, rtol=0)
        torch.testing.assert_close(result["weight_grad"], weight_grad[part.start:part.end], atol=1e-10, rtol=0)
        expected_count = part.num_local if rate == 1.0 else math.ceil(rate * part.num_local)
        positives = torch.unique(labels[(labels >= part.start) & (labels < part.end)])
        assert len(result["sampled"]) == max(expected_count, len(positives))
        assert bool(torch.isin(positives, result["sampled"]).all())
        # Partial FC: W's gradient holds the sampled rows only (sparse); using every row, it is dense
        if len(result["sampled"]) < part.num_local:
            assert torch.equal(result["grad_rows"] + part.start, result["sampled"]), rank
        else:
            assert result["grad_rows"] is None, rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_head_matches_dense_reference_all_cases(world):
    per_rank = job_results(world)
    for index, (name, rate, with_lambda) in enumerate(CASES):
        labels, embeddings, class_lambda = case_data(world, 100 * world + index)
        results = [rank_result["cases"][index] for rank_result in per_rank]
        check_against_reference(world, results, name, rate, labels, embeddings,
                                class_lambda if with_lambda else None)
    if world == 2:  # nothing of (global batch x classes) or (classes x d) on one rank
        batch, itemsize = world * LOCAL_BATCH, 8
        for rank, rank_result in enumerate(per_rank):
            num_local = ClassPartition(CLASSES, world, rank).num_local
            assert rank_result["largest"] <= max(batch * num_local, num_local * DIM) * itemsize
            assert rank_result["largest"] < min(batch * CLASSES, CLASSES * DIM) * itemsize


def _two_groups_case(rank):
    """Ranks {0, 1} and {2, 3} each run their own head on their own data and class count."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both groups
    group_index = rank // 2
    classes = CLASSES - group_index
    labels, embeddings, class_lambda = case_data(2, 500 + group_index, classes=classes)
    head = build_head(MARGINS["arcface"], 0.3, group=groups[group_index], classes=classes)
    return group_index, run_case(head, labels, embeddings, class_lambda, rank % 2)


def test_two_independent_groups_in_one_4_rank_job():
    per_rank = [rank_result["two_groups"] for rank_result in job_results(4)]
    losses = []
    for group_index in (0, 1):
        results = [result for index, result in per_rank if index == group_index]
        classes = CLASSES - group_index
        labels, embeddings, class_lambda = case_data(2, 500 + group_index, classes=classes)
        check_against_reference(2, results, "arcface", 0.3, labels, embeddings, class_lambda, classes=classes)
        losses.append(results[0]["loss"].item())
    assert abs(losses[0] - losses[1]) > 1e-6, "the two groups must compute different losses"


def test_init_rows_do_not_depend_on_the_split():
    classes = 2 * ROWS_PER_INIT_CHUNK + 7
    full = normal_rows(0, classes, 3, std=0.5, seed=9)
    for world in (2, 3, 4):
        pieces = [normal_rows(s, e, 3, std=0.5, seed=9) for s, e in ClassPartition(classes, world, 0).all_ranges()]
        assert torch.equal(torch.cat(pieces), full)
    assert abs(full.std().item() - 0.5) < 0.02
    assert not torch.equal(normal_rows(0, 10, 3, std=0.5, seed=10), full[:10])


def test_sampling_keeps_positives_and_is_reproducible():
    labels = torch.tensor([5, 5, 17, 999, 0, 321, -1])
    first, second = (build_head(MARGINS["arcface"], 0.3, classes=1000) for _ in range(2))
    sampled, local_target = first.sample_classes(labels)
    assert len(sampled) == 300 and bool((sampled[1:] > sampled[:-1]).all())
    valid = labels >= 0
    assert torch.equal(sampled[local_target[valid]], labels[valid])
    assert local_target[-1].item() == -1
    assert torch.equal(second.sample_classes(labels)[0], sampled)  # same seed, same draw
    checkpoint = first.checkpoint_state()  # the sampler state travels in the checkpoint (resume = same negatives)
    next_draw = first.sample_classes(labels)[0]
    assert not torch.equal(next_draw, sampled)  # next step draws new negatives
    second.restore_checkpoint_state(checkpoint, RestoreContext(step=1))
    assert torch.equal(second.sample_classes(labels)[0], next_draw)


def test_positives_beyond_sample_count_are_all_kept():
    head = build_head(MARGINS["arcface"], 0.01, classes=1000)  # ceil(0.01 * 1000) = 10
    labels = torch.arange(0, 1000, 20)  # 50 distinct positives
    sampled, local_target = head.sample_classes(labels)
    assert torch.equal(sampled, labels) and torch.equal(local_target, torch.arange(50))
    assert build_head(MARGINS["arcface"], 0.1, classes=30).num_sample == 3  # no float noise in the ceil


def test_bad_inputs_are_reported():
    head = build_head(MARGINS["arcface"], 1.0, classes=50)
    features = torch.randn(3, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="label 50 at gathered row 1 is outside \\[0, 50\\)"):
        head(features, torch.tensor([0, 50, 3]))
    with pytest.raises(ValueError, match="class_lambda has shape \\(3,\\); expected \\(50,\\)"):
        head(features, torch.tensor([0, 1, 3]), torch.ones(3))
    with pytest.raises(ValueError, match="sample_rate=0.0 must be in \\(0, 1\\]"):
        build_head(MARGINS["arcface"], 0.0)
