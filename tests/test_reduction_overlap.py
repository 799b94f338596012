"""Backbone gradient reduction overlaps backward at every ZeRO stage with the trainer's settings (CPU, gloo)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import run_distributed

BATCH, IMAGE = 2, 32


def _trace_worker(rank: int, world: int, runs: list[tuple[int, bool]]) -> dict:
    from largefr.models import get_model
    from largefr.perf.reduction_trace import trace_reduction
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine, overlapped_backbone

    init_distributed()
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(rank))
    out = {}
    for stage, overlap in runs:
        torch.manual_seed(0)
        backbone = get_model("r18", embedding_size=64, image_size=IMAGE)  # 11M parameters: more than one bucket
        config = build_deepspeed_config(micro_batch_size=BATCH, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=stage, precision="fp32", gradient_clipping=0.0,
                                        overlap_reduction=overlap)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.1), config)
        forward = overlapped_backbone(engine) if overlap else engine
        trace_reduction(engine, forward, images)  # DDP orders its buckets by the first step's gradients
        engine.step()
        trace = trace_reduction(engine, forward, images)
        grads = torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None]) \
            if stage == 0 else None
        out[(stage, overlap)] = {**trace.as_dict(), "grads": grads}
    return out


def test_reduction_starts_before_backward_ends_with_the_trainers_settings():
    runs = [(0, False), (0, True), (1, True), (2, True)]
    per_rank = run_distributed(_trace_worker, 2, runs)
    for rank, result in enumerate(per_rank):
        # DeepSpeed's own ZeRO-0 path: one flat all-reduce after backward (what the trainer no longer uses)
        assert result[(0, False)]["launched_during_backward"] == 0, (rank, result[(0, False)])
        for stage in (0, 1, 2):
            trace = result[(stage, True)]
            assert trace["launched_during_backward"] >= 1, (rank, stage, trace)
            assert trace["backward_compute_end_ms"] < trace["backward_return_ms"]
    # torch DDP's reducer averages exactly what DeepSpeed averaged: the same gradients on every rank
    for result in per_rank:
        torch.testing.assert_close(result[(0, True)]["grads"], result[(0, False)]["grads"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(per_rank[0][(0, True)]["grads"], per_rank[1][(0, True)]["grads"])


def _skip_and_stop_worker(rank: int, world: int) -> dict:
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from largefr.train.head_step import ExternalHeadStep
    from largefr.train.step import StepRunner
    from tests.train_helpers import PoisonedHead, ShardedArcFace, full_weight, rank_batch, tiny_backbone

    init_distributed()
    head = ShardedArcFace(full_weight(5))
    backbone = tiny_backbone()
    config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=1, world_size=world,
                                    zero_stage=0, precision="fp32", gradient_clipping=0.0, overlap_reduction=True)
    engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.5), config)
    runner = StepRunner(engine=engine, head=PoisonedHead(head, lambda call: rank == 1 and call == 1),
                        head_step=ExternalHeadStep(torch.optim.SGD(head.parameters(), lr=0.5), sharded=[head.weight],
                                                   replicated=[], gradient_accumulation_steps=1))
    steps = []
    for index in range(3):  # step 1: NaN on rank 1 only; step 3: rank 0 asks to stop
        result = runner.step([rank_batch(rank, 4, 5, seed=index)], lr=0.5, head_lr=0.5,
                             stop_requested=rank == 0 and index == 2)
        steps.append((result.applied, result.nonfinite_microbatches, result.stop_requested))
    return {"steps": steps, "reducer": type(runner.backbone).__name__,
            "weights": torch.cat([p.detach().flatten() for p in engine.module.parameters()])}


def test_zero0_under_ddp_skips_a_nonfinite_step_everywhere_and_agrees_on_stop():
    results = run_distributed(_skip_and_stop_worker, 2)
    for result in results:
        assert result["reducer"] == "DistributedDataParallel"
        assert result["steps"] == [(False, 1, False), (True, 0, False), (True, 0, True)]
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)  # one replica
