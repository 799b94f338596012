"""Low-memory head (chunk_size > 0) against the default mode on real gloo groups, float64, to 1e-10."""
import functools

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import ShardedMarginHead
from largefr.heads.chunked import chunked_margin_loss
from largefr.heads.margins import MarginStep, build_margin
from tests.distributed_helpers import run_distributed
from tests.test_sharded_head import CLASSES, DIM, MARGINS, SEED, case_data, run_case  # same cases, same step

# chunk 7 leaves a ragged last block on every shard; 4096 is one block wider than any shard
CASES = [(name, rate, with_lambda, chunk) for name in MARGINS for rate in (1.0, 0.3) for with_lambda in (False, True)
         for chunk in ((7,) if with_lambda else (4096,))]


def build_head(name: str, rate: float, chunk: int, dtype=torch.float64) -> ShardedMarginHead:
    return ShardedMarginHead(CLASSES, DIM, margin=MARGINS[name], sample_rate=rate, dtype=dtype, logits_dtype=dtype,
                             generator=torch.Generator().manual_seed(SEED), chunk_size=chunk)


def _both_modes_rank(rank, world):
    results = []
    for index, (name, rate, with_lambda, chunk) in enumerate(CASES):
        labels, embeddings, class_lambda = case_data(world, 10 * world + index)
        lam = class_lambda if with_lambda else None
        default = run_case(build_head(name, rate, 0), labels, embeddings, lam, rank)
        chunked = run_case(build_head(name, rate, chunk), labels, embeddings, lam, rank)
        results.append((default, chunked))
    return dict(cases=results, collectives=_count_collectives(rank, world))


@functools.lru_cache(maxsize=None)
def job_results(world: int) -> list:
    return run_distributed(_both_modes_rank, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunked_equals_default_mode(world):
    for index, case in enumerate(CASES):
        for rank, rank_result in enumerate(job_results(world)):
            default, chunked = rank_result["cases"][index]
            assert torch.equal(default["sampled"], chunked["sampled"]), (case, rank)
            assert abs(default["loss"].item() - chunked["loss"].item()) < 1e-10, (case, rank)
            torch.testing.assert_close(chunked["embedding_grad"], default["embedding_grad"], atol=1e-10, rtol=0)
            torch.testing.assert_close(chunked["weight_grad"], default["weight_grad"], atol=1e-10, rtol=0)
            if case[1] < 1.0:  # rows that were not sampled get exactly zero gradient
                unsampled = torch.ones(len(chunked["weight_grad"]), dtype=torch.bool)
                unsampled[chunked["sampled"] - ClassPartition(CLASSES, world, rank).start] = False
                assert unsampled.any() and not chunked["weight_grad"][unsampled].any()


def _count_collectives(rank, world):
    """(op of every all_reduce, other collectives) in forward+backward of the chunked loss alone."""
    labels, embeddings, _ = case_data(world, 99)
    head = build_head("arcface", 1.0, 100)
    features = embeddings.clone().requires_grad_(True)  # already gathered: no all-gather in the count
    calls, original = [], dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(str(op))
        return original(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    try:
        head.loss_from_gathered(features, labels).backward()
    finally:
        dist.all_reduce = original
    return calls


@pytest.mark.parametrize("world", [2, 3])
def test_two_all_reduces_max_then_sum(world):
    for rank_result in job_results(world):
        assert [op.split(".")[-1] for op in rank_result["collectives"]] == ["MAX", "SUM"]


def _peak_and_largest(head, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, DIM, generator=gen).requires_grad_(True)
    labels = torch.randint(0, head.num_classes, (batch,), generator=gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        head.loss_from_gathered(features, labels).backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak, max(e.nbytes() for e in events)


def test_peak_memory_does_not_grow_with_local_classes():
    batch, chunk, itemsize = 64, 256, 4
    peaks = {}
    for classes in (4000, 16000):
        head = ShardedMarginHead(classes, DIM, margin=HeadConfig(), chunk_size=chunk,
                                 generator=torch.Generator().manual_seed(1))
        peaks[classes], largest = _peak_and_largest(head, batch)
        assert largest <= max(batch * chunk, classes * DIM) * itemsize  # the block or dW, nothing B_g x K
        default_peak, _ = _peak_and_largest(ShardedMarginHead(classes, DIM, margin=HeadConfig(),
                                                              generator=torch.Generator().manual_seed(1)), batch)
        assert peaks[classes] < 0.5 * default_peak
    growth = peaks[16000] - peaks[4000]
    grad_growth = (16000 - 4000) * DIM * itemsize  # dW (and its index) are the only class-sized tensors
    assert growth <= 1.15 * grad_growth + 16000 * 8, (growth, grad_growth)


def test_bfloat16_logits_close_to_float32_default():
    """bf16 logits, default and chunked mode, against the float32 default mode."""
    labels, embeddings, _ = case_data(1, 5)
    losses, grads = [], []
    for dtype, chunk in ((torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 100)):
        head = ShardedMarginHead(CLASSES, DIM, margin=MARGINS["arcface"], logits_dtype=dtype, chunk_size=chunk,
                                 generator=torch.Generator().manual_seed(SEED))
        local = embeddings.float().requires_grad_(True)
        loss = head(local, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and bool(torch.isfinite(head.weight.grad.to_dense()).all())
        losses.append(loss.item())
        grads.append(local.grad)
    for loss, grad in zip(losses[1:], grads[1:]):
        assert abs(losses[0] - loss) < 0.02 * abs(losses[0])
        assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grad.flatten(), dim=0) > 0.99


def test_bad_chunk_size_is_reported():
    with pytest.raises(ValueError, match="chunk_size=-1 must be >= 0"):
        build_head("arcface", 1.0, -1)
    features = torch.randn(3, DIM)
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        chunked_margin_loss(features, torch.randn(5, DIM), None, torch.tensor([0, -1, 2]), build_margin(HeadConfig()),
                            MarginStep(params=None), group=None, chunk_size=0)


def _trainer_heads_rank(rank, world):
    from largefr.config import load_config
    from largefr.train.build import build_head
    from largefr.train.distributed_env import DistributedEnv

    env = DistributedEnv(rank=rank, world_size=world, local_rank=rank, launcher="env", backend="gloo",
                         device=torch.device("cpu"))
    losses = []
    for chunk in (0, 16):
        config = load_config("configs/quickstart.json", [f"head.chunk_size={chunk}", "data.num_classes=50",
                                                         "data.synthetic=null", "data.rec=unused"], world)
        head = build_head(config, env).head.margin_head
        assert head.chunk_size == chunk
        gen = torch.Generator().manual_seed(rank)
        emb = torch.randn(4, config.model.embedding_size, generator=gen)
        labels = torch.randint(0, 50, (4,), generator=gen)
        losses.append(head(emb, labels).item())
    return losses


def test_trainer_config_chunk_size_builds_the_low_memory_head():
    """head.chunk_size reaches the head the trainer builds, with the default mode's loss."""
    for default_loss, chunked_loss in run_distributed(_trainer_heads_rank, 2):
        assert abs(default_loss - chunked_loss) < 1e-5
