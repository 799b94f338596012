"""What runs differently under CUDA/NCCL, pinned on CPU (issue 17).

NCCL refuses a collective on a tensor off the rank's GPU ("No backend type associated with device
type cpu"). `NcclLikeCollectives` stands in for torch.distributed with that rule and the 'meta'
device playing the GPU: a tensor on any other device raises NCCL's error, one on the configured
device reaches the collective, which stops the code there (a meta tensor has no values to reduce).
The paths that must also run end to end are tested with real gloo ranks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed_helpers import run_distributed

GPU_STAND_IN = torch.device("meta")


class CollectiveReached(Exception):
    """The collective got a tensor on the configured device (the test's success signal)."""


class NcclLikeCollectives:
    """Patches torch.distributed: rank 0 of `world` ranks, all_reduce refuses tensors off `device`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, device: torch.device, world: int = 2):
        self.device = device
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor: torch.Tensor, op=None, group=None, async_op=False):
        if tensor.device.type != self.device.type:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise CollectiveReached(str(tensor.device))


# ---------------------------------------------------------------------------- defect 1: rank 0's data setup


def test_first_rank_flag_is_reduced_on_the_configured_device(monkeypatch):
    from largefr.train.build import run_on_first_rank

    NcclLikeCollectives(monkeypatch, GPU_STAND_IN)
    ran = []
    with pytest.raises(CollectiveReached, match="meta"):
        run_on_first_rank(lambda: ran.append(True), "generating the data", device=GPU_STAND_IN)
    assert ran == [True]


# ---------------------------------------------------------------------------- defect 2: no head gradient


def _meta_head_parameter() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(4, 3, device=GPU_STAND_IN))


def test_finiteness_flag_without_gradients_follows_the_parameters(monkeypatch):
    from largefr.train.head_step import grads_finite_everywhere

    NcclLikeCollectives(monkeypatch, GPU_STAND_IN)
    with pytest.raises(CollectiveReached, match="meta"):
        grads_finite_everywhere([_meta_head_parameter()], group=None)


def test_grad_norm_without_gradients_follows_the_parameters(monkeypatch):
    from largefr.train.head_step import global_grad_norm

    NcclLikeCollectives(monkeypatch, GPU_STAND_IN)
    with pytest.raises(CollectiveReached, match="meta"):
        global_grad_norm(sharded=[_meta_head_parameter()], replicated=[], group=None)


def test_head_step_without_gradients_is_skipped_cleanly():
    from largefr.heads.optim import RowSparseAdamW
    from largefr.train.head_step import NO_HEAD_GRADIENT, ExternalHeadStep, TouchedRows

    touched = TouchedRows()
    weight = torch.nn.Parameter(torch.ones(6, 2))
    optimizer = RowSparseAdamW([weight], lr=0.1, row_source=touched.take)
    step = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=2,
                            touched_rows=touched, clip_norm=1.0)
    result = step.step(loss_scale=1.0, engine_step_applied=True)  # every micro-batch was non-finite
    assert not result.applied and result.reason == NO_HEAD_GRADIENT and result.grad_norm is None
    assert torch.equal(weight.detach(), torch.ones(6, 2)) and not optimizer.state


def _all_nonfinite_worker(rank: int, world: int) -> dict:
    from largefr.heads.optim import RowSparseSGD
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from largefr.train.head_step import ExternalHeadStep, TouchedRows
    from largefr.train.step import StepRunner
    from tests.train_helpers import ShardedArcFace, full_weight, rank_batch, tiny_backbone

    init_distributed()
    head = ShardedArcFace(full_weight(5))

    def head_nan(embeddings, labels, momentum_features):
        loss, terms = head(embeddings, labels)
        return loss * float("nan"), terms

    backbone = tiny_backbone()
    gas = 2
    config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=gas, world_size=world,
                                    zero_stage=1, precision="fp32", gradient_clipping=0.0)
    engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.5), config)
    touched = TouchedRows()
    head_optimizer = RowSparseSGD([head.weight], lr=0.5, row_source=touched.take)
    runner = StepRunner(engine=engine, head=head_nan, on_nonfinite="skip",
                        head_step=ExternalHeadStep(head_optimizer, sharded=[head.weight], replicated=[],
                                                   gradient_accumulation_steps=gas, touched_rows=touched))
    before = head.weight.detach().clone()
    result = runner.train_step([rank_batch(rank, 4, 5, seed=m) for m in range(gas)], lr=0.5, head_lr=0.5)
    return {"applied": result.applied, "nonfinite": result.nonfinite_microbatches, "reason": result.skip_reason,
            "head_unchanged": torch.equal(before, head.weight.detach())}


def test_step_with_every_micro_batch_nonfinite_skips_the_head_step():
    from largefr.train.head_step import NO_HEAD_GRADIENT

    for result in run_distributed(_all_nonfinite_worker, 2):
        assert result == {"applied": False, "nonfinite": 2, "reason": NO_HEAD_GRADIENT, "head_unchanged": True}
