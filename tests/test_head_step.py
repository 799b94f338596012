"""The external head's gradient handling: fp16 unscale/skip, 1/gas, clipping, feature-gradient factor.

Real fp16 needs a GPU (DeepSpeed's CPU accelerator refuses it), so the unscale/skip logic is
tested as the function the trainer feeds with the engine's loss scale and overflow flag; the
gradient-accumulation equivalence runs real DeepSpeed engines on 2 gloo ranks.
"""
from __future__ import annotations

import pytest
import torch

from largefr.train.head_step import (ExternalHeadStep, backbone_gradient_factor, decide_head_step,
                                     head_gradient_multiplier, is_all_finite, scale_feature_gradient)
from tests.distributed_helpers import run_distributed
from tests.train_helpers import ShardedArcFace, dense_reference, full_weight, rank_batch, tiny_backbone


def test_multiplier_is_one_over_scale_times_gas():
    assert head_gradient_multiplier(loss_scale=1024.0, gradient_accumulation_steps=4) == pytest.approx(1 / 4096)
    assert head_gradient_multiplier(loss_scale=1.0, gradient_accumulation_steps=1) == 1.0
    with pytest.raises(ValueError, match="loss scale must be a positive finite"):
        head_gradient_multiplier(loss_scale=float("inf"), gradient_accumulation_steps=1)


@pytest.mark.parametrize("applied,finite,expect,reason", [
    (True, True, True, "applied"), (False, True, False, "overflow"), (True, False, False, "non-finite")])
def test_decision_follows_engine_and_head_gradients(applied, finite, expect, reason):
    decision = decide_head_step(loss_scale=256.0, engine_step_applied=applied, head_grads_finite=finite,
                                gradient_accumulation_steps=2)
    assert decision.apply is expect and reason in decision.reason


def _head(momentum: float = 0.9):
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(5, 4))
    optimizer = torch.optim.SGD([weight], lr=0.5, momentum=momentum)
    return weight, optimizer


def _loss(weight: torch.Tensor) -> torch.Tensor:
    return (weight.sin() * torch.arange(20.0).view(5, 4)).sum()


def test_fp16_scaled_gradients_are_unscaled_before_the_step():
    scale, gas = 2.0**14, 2
    plain_weight, plain_opt = _head()
    (_loss(plain_weight) / gas * gas).backward()  # mean of 2 identical micro-batches
    plain_opt.step()

    weight, optimizer = _head()
    for _ in range(gas):  # what engine.backward does to the external head: loss x scale, summed over micro-batches
        (_loss(weight) * scale).backward()
    result = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=gas).step(
        loss_scale=scale, engine_step_applied=True)
    assert result.applied
    torch.testing.assert_close(weight.detach(), plain_weight.detach(), rtol=1e-6, atol=1e-7)
    assert weight.grad is None


def test_step_skipped_when_engine_skipped_overflow():
    weight, optimizer = _head()
    (_loss(weight) * 512.0).backward()
    optimizer.step()  # give SGD a momentum buffer to check it is left alone
    optimizer.zero_grad()
    before_weight = weight.detach().clone()
    before_buffer = optimizer.state[weight]["momentum_buffer"].clone()
    (_loss(weight) * 512.0).backward()
    result = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=1).step(
        loss_scale=512.0, engine_step_applied=False)
    assert not result.applied and "overflow" in result.reason
    assert torch.equal(weight.detach(), before_weight)
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], before_buffer)
    assert weight.grad is None  # the overflowed gradients must not leak into the next step


def test_nonfinite_head_gradient_skips_step():
    weight, optimizer = _head(momentum=0.0)
    before = weight.detach().clone()
    weight.grad = torch.full_like(weight, float("inf"))
    result = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=1).step(
        loss_scale=1.0, engine_step_applied=True)
    assert not result.applied and "non-finite" in result.reason
    assert torch.equal(weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finiteness_check_agrees_with_isfinite_everywhere(dtype):
    """One NaN or infinity at any place (first, last, inside a vectorised run) of a gradient, or none."""
    values = torch.randn(37, 19, generator=torch.Generator().manual_seed(0)).to(dtype)
    cases = [values, values[:0], values[:, ::2]]  # as is, empty, strided
    for bad in (float("nan"), float("inf"), float("-inf")):
        for place in (0, 1, 300, values.numel() - 1):
            poisoned = values.clone()
            poisoned.view(-1)[place] = bad
            cases.append(poisoned)
    for case in cases:
        assert bool(is_all_finite(case)) == bool(torch.isfinite(case).all()), case


def test_feature_gradient_factor_scales_backward_only():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = scale_feature_gradient(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    torch.testing.assert_close(x.grad, 2.5 * torch.arange(12.0, dtype=torch.float64).view(3, 4))
    assert backbone_gradient_factor(world_size=4, gradient_accumulation_steps=2) == 2.0


# ---------------------------------------------------------------------------- distributed


def _clip_worker(rank: int, world: int) -> dict:
    generator = torch.Generator().manual_seed(11 + rank)
    shard = torch.nn.Parameter(torch.zeros(3 + rank, 2))
    shard.grad = torch.randn(3 + rank, 2, generator=generator)
    tau = torch.nn.Parameter(torch.zeros(1))
    tau.grad = torch.tensor([0.7])  # replicated: identical on every rank, counted once
    grads = (shard.grad.clone(), tau.grad.clone())
    step = ExternalHeadStep(torch.optim.SGD([shard, tau], lr=1.0), sharded=[shard], replicated=[tau],
                            gradient_accumulation_steps=1, clip_norm=0.5)
    result = step.step(loss_scale=1.0, engine_step_applied=True)
    return {"grads": grads, "norm": result.grad_norm, "shard_update": -shard.detach(), "tau_update": -tau.detach()}


def test_head_clipping_uses_global_norm_over_shards():
    results = run_distributed(_clip_worker, 2)
    shard_grads = torch.cat([r["grads"][0].flatten() for r in results])
    tau_grad = results[0]["grads"][1]
    norm = torch.cat([shard_grads, tau_grad]).norm().item()
    coefficient = min(1.0, 0.5 / (norm + 1e-6))
    for result in results:
        assert result["norm"] == pytest.approx(norm, rel=1e-6)
        torch.testing.assert_close(result["shard_update"], result["grads"][0] * coefficient)
        torch.testing.assert_close(result["tau_update"], tau_grad * coefficient)


NUM_CLASSES, MICRO = 7, 3


def _accumulation_worker(rank: int, world: int, stages: list[int]) -> dict:
    from largefr.heads.momentum import MomentumEncoder
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from largefr.train.step import StepRunner

    env = init_distributed()
    images, labels = rank_batch(rank, 2 * MICRO, NUM_CLASSES)
    out = {}
    for stage in stages:
        for gas in (1, 2):
            backbone = tiny_backbone()
            before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
            encoder = MomentumEncoder(tiny_backbone(seed=9), momentum=0.75)
            encoder_before = {n: p.detach().clone() for n, p in encoder.encoder.named_parameters()}
            head = ShardedArcFace(full_weight(NUM_CLASSES))
            head_before = head.weight.detach().clone()
            config = build_deepspeed_config(micro_batch_size=2 * MICRO // gas, gradient_accumulation_steps=gas,
                                            world_size=world, zero_stage=stage, precision="fp32", gradient_clipping=0.0)
            engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=1.0, momentum=0.0),
                                   config)
            head_step = ExternalHeadStep(torch.optim.SGD([head.weight], lr=1.0), sharded=[head.weight], replicated=[],
                                         gradient_accumulation_steps=gas)
            runner = StepRunner(engine=engine, head=head, head_step=head_step, momentum_encoder=encoder,
                                encoder_momentum=0.75, device=env.device)
            micro_batches = list(zip(images.chunk(gas), labels.chunk(gas)))
            step = runner.step(micro_batches, lr=1.0, head_lr=1.0)
            after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            out[(stage, gas)] = {
                "backbone": {n: before[n] - after[n] for n in before}, "head": head_before - head.weight.detach(),
                "loss": float(step.loss), "start": head.partition.start,
                "ema_error": max((encoder.encoder.get_parameter(n) - (0.75 * encoder_before[n] + 0.25 * after[n]))
                                 .abs().max().item() for n in after)}
    return out


def test_gradient_accumulation_2_equals_one_step_over_same_samples():
    world, stages = 2, [1, 2]
    per_rank = run_distributed(_accumulation_worker, world, stages)
    batches = [rank_batch(r, 2 * MICRO, NUM_CLASSES) for r in range(world)]
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    _, ref_backbone, ref_weight = dense_reference(tiny_backbone(), full_weight(NUM_CLASSES), images, labels)
    for stage in stages:
        for rank, result in enumerate(per_rank):
            one, two = result[(stage, 1)], result[(stage, 2)]
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
            for name, grad in ref_backbone.items():
                torch.testing.assert_close(two["backbone"][name], one["backbone"][name], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(two["backbone"][name].double(), grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(two["head"], one["head"], rtol=1e-4, atol=1e-6)
            rows = ref_weight[two["start"]:two["start"] + two["head"].shape[0]]
            torch.testing.assert_close(two["head"].double(), rows, rtol=1e-4, atol=1e-5)
            assert one["ema_error"] < 1e-6 and two["ema_error"] < 1e-6  # EMA from the post-step backbone


def test_touched_rows_union_feeds_row_sparse_optimizer():
    from largefr.heads.optim import RowSparseSGD
    from largefr.train.step import union_rows

    weight = torch.nn.Parameter(torch.ones(6, 2))
    optimizer = RowSparseSGD([weight], lr=1.0)
    step = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=2)
    # micro-batch 1 sampled rows 0 and 3, micro-batch 2 rows 3 and 4; a non-finite one named none
    rows = union_rows([torch.tensor([0, 3]), None, torch.tensor([3, 4])])
    weight.grad = torch.full((6, 2), 2.0)
    step.step(loss_scale=1.0, engine_step_applied=True, rows=rows)
    assert weight[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # grad 2 x 1/gas on the union only
    assert union_rows([None, None]) is None

    weight.grad = torch.ones(6, 2)
    step.step(loss_scale=1.0, engine_step_applied=False, rows=torch.tensor([1]))  # skipped: rows not stepped
    assert weight.grad is None and weight[1, 0].item() == 1.0
