"""Issues 18 and 27's GPU checks: the head's CUDA kernels (one rank, and two gloo ranks sharing the GPU), NCCL
DeepSpeed steps (ZeRO 0/1/2 in bf16, ZeRO 1/2 in fp16), training runs (bf16, and fp16 with a moving loss scale),
checkpoints, memory, and torch.compile + channels_last on MobileFaceNet.

Marked `gpu`, skipped without CUDA: `python -m pytest -q -m gpu tests/gpu` (tools/gpu_acceptance.sh runs it,
the compile test in a step of its own). LARGEFR_GPU_TESTS_ON_CPU=1 runs all but the fp16 run and the compile
test on the CPU, fp16 engine steps included (tests/gpu/gpu_helpers.py), so their logic is checked before a GPU
sees them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.gpu_helpers import (CPU_RANK_ENV, DEVICE, ON_CPU, allow_fp16_on_the_cpu_stand_in, needs_cuda,
                                   needs_device, small_run_config, spawn_one_rank, spawn_ranks, train_run)
from tests.train_helpers import ShardedArcFace, dense_reference, full_weight, rank_batch, tiny_backbone

pytestmark = [pytest.mark.gpu, needs_device]

CLASSES, DIM, BATCH, SCALE, MARGIN = 5003, 64, 96, 32.0, 0.4
LOGITS = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 3e-2)}  # dtype, relative tolerance


# ---------------------------------------------------------------------------- the head on the device


def _head_on_device(rate: float, chunk: int, logits: str):
    from largefr.config import HeadConfig
    from largefr.heads.sharded_head import ShardedMarginHead

    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(type="arcface", scale=SCALE, margin=MARGIN),
                             sample_rate=rate, chunk_size=chunk, logits_dtype=LOGITS[logits][0], device=DEVICE,
                             generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    local = embeddings.float().to(DEVICE).requires_grad_(True)
    loss = head(local, labels.to(DEVICE))
    loss.backward()
    return (head.weight.detach().double().cpu(), head.last_sampled.cpu(), embeddings, labels, float(loss.detach()),
            local.grad.double().cpu(), head.weight.grad.to_dense().double().cpu())


def _arcface_reference(weight, sampled, embeddings, labels):
    """float64 ArcFace cross entropy over the sampled classes, written from the formula; loss and gradients."""
    embeddings, weight = embeddings.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight[sampled], dim=1).t()
    column = torch.searchsorted(sampled, labels)
    assert torch.equal(sampled[column], labels), "a positive is missing from the sampled classes"
    positive = F.one_hot(column, len(sampled)).bool()
    theta = torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    # insightface's continuation past theta + m = pi: cos - m sin(m)
    target = torch.where(theta + MARGIN <= math.pi, torch.cos(theta + MARGIN), cos - MARGIN * math.sin(MARGIN))
    loss = F.cross_entropy(SCALE * torch.where(positive, target, cos), column)
    loss.backward()
    return float(loss), embeddings.grad, weight.grad


@pytest.mark.parametrize("logits", list(LOGITS))
@pytest.mark.parametrize("rate,chunk", [(1.0, 0), (0.3, 0), (1.0, 1024), (0.3, 1024)],
                         ids=["sharded", "sharded_partial_fc", "chunked", "chunked_partial_fc"])
def test_head_on_device_matches_cpu_float64_reference(rate, chunk, logits):
    weight, sampled, embeddings, labels, loss, embedding_grad, weight_grad = _head_on_device(rate, chunk, logits)
    ref_loss, ref_embedding_grad, ref_weight_grad = _arcface_reference(weight, sampled, embeddings, labels)
    tolerance = LOGITS[logits][1]
    assert loss == pytest.approx(ref_loss, rel=tolerance)
    torch.testing.assert_close(embedding_grad, ref_embedding_grad, rtol=tolerance,
                               atol=tolerance * float(ref_embedding_grad.abs().max()))
    torch.testing.assert_close(weight_grad[sampled], ref_weight_grad[sampled], rtol=tolerance,
                               atol=tolerance * float(ref_weight_grad.abs().max()))


def _head_on_shared_device(rank: int, world: int, rate: float) -> dict:
    """This rank's share of the head's forward/backward, its CUDA tensors passed through gloo collectives."""
    import torch.distributed as dist

    from largefr.config import HeadConfig
    from largefr.heads.sharded_head import ShardedMarginHead

    dist.init_process_group("gloo", init_method="env://")  # NCCL refuses two ranks on one GPU; gloo takes both
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(type="arcface", scale=SCALE, margin=MARGIN),
                             sample_rate=rate, device=DEVICE, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local = embeddings[rows].float().to(DEVICE).requires_grad_(True)
    loss = head(local, labels[rows].to(DEVICE))
    loss.backward()
    result = {"device": str(loss.device), "loss": float(loss.detach()), "weight": head.weight.detach().double().cpu(),
              "sampled": head.last_sampled.cpu() + head.partition.start, "embedding_grad": local.grad.double().cpu(),
              "weight_grad": head.weight.grad.to_dense().double().cpu(), "rows": rows}
    dist.destroy_process_group()
    return result


@pytest.mark.parametrize("rate", [1.0, 0.3], ids=["sharded", "sharded_partial_fc"])
def test_two_gloo_ranks_sharing_the_device_match_the_float64_reference(rate):
    """Two ranks on the one GPU, each holding half of W (2502 + 2501 rows) and half of the batch."""
    ranks = spawn_ranks(_head_on_shared_device, 2, rate)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    weight = torch.cat([r["weight"] for r in ranks])
    sampled = torch.cat([r["sampled"] for r in ranks])
    ref_loss, ref_embedding_grad, ref_weight_grad = _arcface_reference(weight, sampled, embeddings, labels)
    offset = 0
    for result in ranks:
        assert result["device"] == str(DEVICE) and result["loss"] == pytest.approx(ref_loss, rel=1e-4)
        torch.testing.assert_close(result["embedding_grad"], ref_embedding_grad[result["rows"]], rtol=1e-4,
                                   atol=1e-4 * float(ref_embedding_grad.abs().max()))
        mine = ref_weight_grad[offset:offset + len(result["weight"])]
        local_sampled = result["sampled"] - offset
        torch.testing.assert_close(result["weight_grad"][local_sampled], mine[local_sampled], rtol=1e-4,
                                   atol=1e-4 * float(ref_weight_grad.abs().max()))
        offset += len(result["weight"])


HEAD_MEMORY_CASES = {"default": (1.0, "fp32", 0, "fp32"), "partial_fc": (0.3, "fp32", 0, "fp32"),
                     "bf16": (1.0, "bf16", 0, "fp32"), "chunked": (1.0, "fp32", 8192, "fp32"),
                     "partial_fc_bf16_storage": (0.3, "fp32", 0, "bf16")}
"""(sample rate, logits precision, chunk size, head.weight_dtype)."""


@pytest.mark.parametrize("case", list(HEAD_MEMORY_CASES))
def test_head_max_memory_allocated_matches_the_planner(case):
    from largefr.perf.head_bench import HeadBench, HeadBenchSettings
    from largefr.perf.memory_plan import PlanInputs, plan_memory

    rate, precision, chunk, weight_dtype = HEAD_MEMORY_CASES[case]
    classes, batch, dim = (20_000, 64, 64) if ON_CPU else (400_000, 256, 256)
    settings = HeadBenchSettings(batch=batch, classes=classes, dim=dim, world=1, sample_rate=rate,
                                 dtype={"fp32": "float32", "bf16": "bfloat16"}[precision], chunk_size=chunk,
                                 weight_dtype={"fp32": "float32", "bf16": "bfloat16"}[weight_dtype],
                                 gemm_floor=False, threads=1)
    measured = HeadBench(settings, 0, DEVICE).peak_memory_mb() * 2**20  # GPU: torch.cuda.max_memory_allocated
    planned = plan_memory(PlanInputs(num_classes=classes, world_size=1, dim=dim, batch=batch, sample_rate=rate,
                                     precision=precision, weight_dtype=weight_dtype, optimizer="none",
                                     chunk_size=chunk, bank=False)).head_step_peak
    assert abs(planned / measured - 1) < 0.15, (case, planned / 2**20, measured / 2**20)


# ---------------------------------------------------------------------------- DeepSpeed engine steps


ENGINE_CLASSES, ENGINE_BATCH = 7, 5


def _engine_steps(rank: int, world: int, runs: list[tuple[int, str, dict]]) -> list[dict]:
    """One step per (ZeRO stage, precision, user deepspeed section) of a fresh engine + external head, in order."""
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import (accelerator_facts, build_deepspeed_config, build_optimizer, create_engine,
                                      engine_loss_scale)
    from largefr.train.head_step import ExternalHeadStep
    from largefr.train.step import StepRunner

    if any(precision == "fp16" for _, precision, _ in runs):
        allow_fp16_on_the_cpu_stand_in()
    env = init_distributed()
    accelerator, fp16_supported = accelerator_facts()
    images, labels = rank_batch(rank, ENGINE_BATCH, ENGINE_CLASSES)
    results = []
    for stage, precision, section in runs:
        backbone = tiny_backbone()
        head = ShardedArcFace(full_weight(ENGINE_CLASSES)).to(env.device)
        head_before = head.weight.detach().cpu().clone()
        config = build_deepspeed_config(micro_batch_size=ENGINE_BATCH, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=stage, precision=precision, gradient_clipping=0.0,
                                        user_section=section, accelerator_name=accelerator,
                                        fp16_supported=fp16_supported)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=1.0, momentum=0.0),
                               config)
        # The engine's own (bf16/fp16) weights: the fp32 originals differ from them by the cast's rounding,
        # which a skipped step would show as an update (found by the fp16 test on the CPU stand-in).
        before = {name: p.detach().float().cpu().clone() for name, p in engine.module.named_parameters()}
        head_step = ExternalHeadStep(torch.optim.SGD(head.parameters(), lr=1.0), sharded=[head.weight],
                                     replicated=[], gradient_accumulation_steps=1)
        runner = StepRunner(engine=engine, head=head, head_step=head_step, device=env.device)
        loss_scale = engine_loss_scale(engine)
        step = runner.step([(images, labels)], lr=1.0, head_lr=1.0)
        after = {name: p.detach().float().cpu() for name, p in engine.module.named_parameters()}
        results.append({
            "backbone": {n: before[n] - after[n] for n in before}, "head": head_before - head.weight.detach().cpu(),
            "applied": step.applied, "reason": step.skip_reason, "loss": float(step.loss), "loss_scale": loss_scale,
            "head_grad_cleared": head.weight.grad is None, "device": str(env.device)})
    return results


def _check_step(got: dict, name: str, ref_loss: float, ref_backbone: dict, ref_weight: torch.Tensor) -> None:
    assert got["applied"], f"{name}: step not applied ({got['reason']})"
    assert got["loss"] == pytest.approx(ref_loss, rel=2e-2), name
    for param, grad in ref_backbone.items():  # SGD lr 1, no momentum: the update is the gradient
        # bf16/fp16 forward and backward of the backbone: a few percent of each gradient
        torch.testing.assert_close(got["backbone"][param].double(), grad, rtol=5e-2, atol=3e-2,
                                   msg=lambda m: f"{name} {param}: {m}")
    torch.testing.assert_close(got["head"].double(), ref_weight, rtol=1e-2, atol=3e-2,
                               msg=lambda m: f"{name} head: {m}")


def _engine_reference():
    images, labels = rank_batch(0, ENGINE_BATCH, ENGINE_CLASSES)
    return dense_reference(tiny_backbone(), full_weight(ENGINE_CLASSES), images, labels)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_rank_engine_step_in_bf16_matches_dense_reference(stage):
    got = spawn_one_rank(_engine_steps, [(stage, "bf16", {})])[0]
    assert got["device"] == str(DEVICE) and got["loss_scale"] == 1.0
    _check_step(got, f"ZeRO {stage} bf16", *_engine_reference())


# The reference's backbone gradients reach 11.2: DeepSpeed's default scale 2^16 would overflow fp16 (max 65504)
# in the backward already (found by running this test on the CPU stand-in), so the applied step uses 2^8.
FP16_SCALED = {"fp16": {"initial_scale_power": 8}}
FP16_OVERFLOW = {"fp16": {"initial_scale_power": 40}}  # 2^40 x the loss overflows fp16 in the backbone's backward


@pytest.mark.parametrize("stage", [1, 2])
def test_one_rank_fp16_engine_scales_the_loss_unscales_the_head_and_skips_an_overflow(stage):
    runs = [(stage, "fp16", FP16_SCALED), (stage, "fp16", FP16_OVERFLOW)]
    scaled, skipped = spawn_one_rank(_engine_steps, runs)
    assert scaled["loss_scale"] == 2.0**8
    _check_step(scaled, f"ZeRO {stage} fp16", *_engine_reference())  # head update unscaled: equals the reference
    assert not skipped["applied"] and "overflow" in skipped["reason"], skipped["reason"]
    assert all(float(update.abs().max()) == 0.0 for update in skipped["backbone"].values())
    assert float(skipped["head"].abs().max()) == 0.0 and skipped["head_grad_cleared"]


# ---------------------------------------------------------------------------- training runs and checkpoints


@pytest.mark.parametrize("loader", ["synthetic", "torch"])
def test_short_bf16_training_run_on_the_device(loader, tmp_path):
    config = small_run_config(tmp_path, data={"loader": loader}, train={"precision": "bf16", "max_steps": 3})
    result = spawn_one_rank(train_run, config, None)
    assert result["step"] == 3 and result["device"] == str(DEVICE)
    assert result["summary"]["skipped_nonfinite_steps"] == 0
    assert torch.isfinite(torch.tensor(result["summary"]["final_loss"])), result["summary"]


def test_checkpoint_saved_on_the_device_resumes_on_cpu_and_back(tmp_path):
    config = small_run_config(tmp_path, train={"max_steps": 2})
    first = spawn_one_rank(train_run, config, None)
    config["train"]["max_steps"] = 3
    on_cpu = spawn_one_rank(train_run, config, "auto", env=CPU_RANK_ENV)
    config["train"]["max_steps"] = 4
    back = spawn_one_rank(train_run, config, "auto")
    assert (first["step"], on_cpu["step"], back["step"]) == (2, 3, 4)
    assert (first["device"], on_cpu["device"], back["device"]) == (str(DEVICE), "cpu", str(DEVICE))


FP16_RUN_STEPS = 12
FP16_DYNAMIC = {"fp16": {"initial_scale_power": 12, "loss_scale_window": 2, "hysteresis": 1}}
"""The scale halves at every overflow and doubles after 2 clean steps. On the CPU stand-in (2026-12-06, this
test's steps with SPAWN_TIMEOUT_S raised: 117 s) mbf overflowed at every scale from 2^16 down to 2^9 and
trained at 2^8, so from 2^12 the 12 steps see overflows, applied steps and the scale growing again."""


def _fp16_steps(rank: int, world: int, config_dict: dict) -> list[dict]:
    """The trainer's own steps in fp16, with the loss scale each one used and whether it was applied."""
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed, shutdown_distributed
    from largefr.train.engine import engine_loss_scale

    allow_fp16_on_the_cpu_stand_in()
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed())
    steps, source = [], trainer.step_batches()
    for _ in range(FP16_RUN_STEPS):
        scale = engine_loss_scale(trainer.runner.engine)
        result = trainer.run_step(next(source))
        trainer.state.step += 1
        steps.append({"scale": scale, "applied": result.applied, "reason": result.skip_reason,
                      "loss": float(result.loss), "device": str(trainer.runner.device)})
    source.close()
    trainer.metrics.close()
    shutdown_distributed(wait_for_peers=True)
    return steps


@needs_cuda  # on the CPU stand-in mbf's fp16 convolutions take minutes; the engine tests above run there
def test_short_fp16_training_run_moves_the_loss_scale_and_skips_overflows(tmp_path):
    config = small_run_config(tmp_path, train={"precision": "fp16", "zero_stage": 1, "max_steps": FP16_RUN_STEPS})
    config["deepspeed"] = FP16_DYNAMIC
    steps = spawn_one_rank(_fp16_steps, config)
    assert {step["device"] for step in steps} == {str(DEVICE)}
    skipped = [i for i, step in enumerate(steps) if not step["applied"]]
    assert skipped and all("overflow" in steps[i]["reason"] for i in skipped), steps
    assert any(step["applied"] for step in steps), steps
    for i in skipped[:-1] if skipped[-1] == len(steps) - 1 else skipped:  # hysteresis 1: halved at once
        assert steps[i + 1]["scale"] == steps[i]["scale"] / 2, (i, steps)
    assert all(math.isfinite(step["loss"]) for step in steps if step["applied"]), steps


# ---------------------------------------------------------------------------- torch.compile (its own step)


@needs_cuda  # inductor on a CPU compiles for minutes; tests/test_compile.py checks the switches on CPU
def test_compile_and_channels_last_train_mobilefacenet_like_eager(tmp_path):
    """train.compile + train.channels_last on mbf in bf16: compiled without falling back, same losses as eager."""
    losses = {}
    for name, switches in {"eager": {}, "compiled": {"compile": True, "channels_last": True}}.items():
        config = small_run_config(tmp_path / name, train={"precision": "bf16", "max_steps": 3, **switches})
        result = spawn_one_rank(_losses_and_warnings, config)
        assert result["warnings"] == [] and result["compiled"] == bool(switches), result
        losses[name] = result["losses"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=5e-2), losses


def _losses_and_warnings(rank: int, world: int, config_dict: dict) -> dict:
    import warnings

    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed, shutdown_distributed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed())
        trainer.loss_history = []
        trainer.train()
    trainer.metrics.close()
    shutdown_distributed(wait_for_peers=True)
    return {"losses": [float(loss) for loss in trainer.loss_history], "compiled": trainer.runner.engine.is_compiled,
            "warnings": [str(w.message) for w in caught if "train.compile" in str(w.message)]}
