"""Issue 28's GPU check: with the shipped settings the backbone's gradient reduction starts before backward ends.

Two gloo ranks share the one GPU (NCCL refuses two ranks on one device), each running the trainer's engine
path on CUDA tensors: ZeRO 0 under torch DDP's reducer (`overlapped_backbone`, quickstart.json) and ZeRO 1
with DeepSpeed's overlap_comm (the ms1m/webface configs). `largefr.perf.reduction_trace` reads a
torch.profiler trace of one backward: on a GPU its times are the host's, so "started before backward
ended" means the reduction was launched while backward was still issuing its gradient kernels. The same
check on the CPU is tests/test_reduction_overlap.py; LARGEFR_GPU_TESTS_ON_CPU=1 runs this one on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu.gpu_helpers import DEVICE, needs_device, spawn_ranks

pytestmark = [pytest.mark.gpu, needs_device]

BATCH, IMAGE, STAGES = 8, 112, (0, 1)


def _reduction_traces(rank: int, world: int, stages: tuple[int, ...]) -> dict:
    import torch.distributed as dist

    from largefr.models import get_model
    from largefr.perf.reduction_trace import trace_reduction
    from largefr.train.engine import (accelerator_facts, build_deepspeed_config, build_optimizer, create_engine,
                                      overlapped_backbone)

    dist.init_process_group("gloo", init_method="env://")
    accelerator, fp16_supported = accelerator_facts()
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(rank)).to(DEVICE)
    traces = {}
    for stage in stages:
        torch.manual_seed(0)
        backbone = get_model("r18", embedding_size=512, image_size=IMAGE).to(DEVICE)  # 24M parameters: many buckets
        config = build_deepspeed_config(micro_batch_size=BATCH, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=stage, precision="fp32", gradient_clipping=0.0,
                                        overlap_reduction=True, accelerator_name=accelerator,
                                        fp16_supported=fp16_supported)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.1), config)
        forward = overlapped_backbone(engine)
        trace_reduction(engine, forward, images)  # DDP orders its buckets by the first step's gradients
        engine.step()
        traces[stage] = {**trace_reduction(engine, forward, images).as_dict(),
                         "device": str(next(engine.module.parameters()).device)}
    dist.destroy_process_group()
    return traces


def test_backbone_gradient_reduction_starts_before_backward_ends_on_the_device():
    for rank, traces in enumerate(spawn_ranks(_reduction_traces, 2, STAGES)):
        for stage, trace in traces.items():
            assert trace["device"].startswith(DEVICE.type), (rank, stage, trace["device"])
            assert trace["launched_during_backward"] >= 1, (rank, stage, trace)
            assert trace["backward_compute_end_ms"] < trace["backward_return_ms"], (rank, stage, trace)
