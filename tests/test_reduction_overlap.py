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
