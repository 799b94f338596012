"""DeepSpeed config building, and backbone/head gradients after the engine's reduction (docs/DESIGN.md 4).

The distributed test trains one step of a real DeepSpeed engine (ZeRO 0, 1 and 2, fp32, 2 gloo
ranks) plus an external sharded ArcFace head with SGD lr=1 and no momentum, so each parameter's
update IS its gradient, and compares with a dense float64 single-process computation on the
global batch.
"""
from __future__ import annotations

import re

import pytest
import torch

from largefr.choices import DEEPSPEED_OWNED_KEYS, OPTIMIZER_NAMES
from largefr.config import Config, ConfigError
from largefr.train.engine import EngineConfigError, build_deepspeed_config, build_optimizer
from tests.distributed_helpers import run_distributed
from tests.train_helpers import ShardedArcFace, dense_reference, full_weight, rank_batch, tiny_backbone

NUM_CLASSES, BATCH = 7, 5  # 7 classes on 2 ranks: uneven shards (4 + 3)


def _config(**overrides):
    args = dict(micro_batch_size=8, gradient_accumulation_steps=2, world_size=4, zero_stage=1,
                precision="bf16", gradient_clipping=0.0)
    args.update(overrides)
    return build_deepspeed_config(**args)


def test_config_maps_largefr_keys():
    config = _config(gradient_clipping=5.0, zero_stage=2)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 8 * 2 * 4
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 5.0


def test_gradient_clipping_written_even_when_off():
    # DeepSpeed >= 0.19.3 clips at 1.0 when the key is absent
    assert _config(gradient_clipping=0.0)["gradient_clipping"] == 0.0


def test_user_section_merged_deeply():
    extra = {"zero_optimization": {"overlap_comm": True}, "bf16": {"immediate_grad_update": True}}
    config = _config(user_section=extra)
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert config["bf16"] == {"enabled": True, "immediate_grad_update": True}


def _checked_config(**sections) -> Config:
    """A Config built (and checked) from a minimal one plus `sections`."""
    return Config.from_dict({"data": {"rec": "/data/ms1m", "num_classes": 100, "num_images": 5000},
                             "output": "/tmp/run", **sections})


# The deepspeed section is checked once, by the config (largefr.choices.DEEPSPEED_OWNED_KEYS); the
# engine builds its DeepSpeed config from a checked Config and does not check again.
@pytest.mark.parametrize("key,source", [("train_micro_batch_size_per_gpu", "train.batch_size"),
                                        ("gradient_clipping", "optim.gradient_clipping"),
                                        ("optimizer", "optim"), ("scheduler", "schedule")])
def test_user_section_may_not_set_derived_keys(key, source):
    with pytest.raises(ConfigError, match=rf"deepspeed\.{key}: set by the trainer; remove it and set {source}"):
        _checked_config(deepspeed={key: {}})


@pytest.mark.parametrize("section,key,source", [("zero_optimization", "stage", "train.zero_stage"),
                                                ("fp16", "enabled", "train.precision"),
                                                ("bf16", "enabled", "train.precision")])
def test_user_section_may_not_set_derived_nested_keys(section, key, source):
    with pytest.raises(ConfigError, match=rf"deepspeed\.{section}\.{key}: set by the trainer; remove it and set {source}"):
        _checked_config(deepspeed={section: {key: 2}})


def _dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _dotted_keys(value, prefix + key + ".")
    return keys


def test_every_key_the_engine_derives_is_owned_and_refused():
    written = _dotted_keys(_config())
    derived = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "zero_optimization.stage", "bf16.enabled", "fp16.enabled"}
    assert derived <= written and derived <= set(DEEPSPEED_OWNED_KEYS)
    # optimizer, scheduler and amp are not written: largefr passes its own optimizer and sets the lrs itself
    assert not {"optimizer", "scheduler", "amp"} & written
    for dotted in DEEPSPEED_OWNED_KEYS:
        section: dict = {}
        *parents, leaf = dotted.split(".")
        node = section
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = 1
        with pytest.raises(ConfigError, match=rf"deepspeed\.{re.escape(dotted)}: set by the trainer"):
            _checked_config(deepspeed=section)


def test_zero3_refused_with_reason():
    with pytest.raises(ConfigError, match="zero_stage: ZeRO-3 is not supported yet.*momentum encoder"):
        _checked_config(train={"zero_stage": 3})


def test_fp16_refused_on_cpu_accelerator():
    with pytest.raises(EngineConfigError, match="cpu accelerator refuses fp16.*bf16 or fp32"):
        _config(precision="fp16", accelerator_name="cpu", fp16_supported=False)


def test_fp16_with_zero0_refused():
    with pytest.raises(EngineConfigError, match="zero_stage=0.*does not scale the loss"):
        _config(precision="fp16", zero_stage=0, accelerator_name="cuda", fp16_supported=True)


def test_fp16_on_gpu_accelerator_accepted():
    config = _config(precision="fp16", zero_stage=2, accelerator_name="cuda", fp16_supported=True)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False


def test_build_optimizer_kinds():
    params = [torch.nn.Parameter(torch.zeros(2))]
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert set(kinds) == set(OPTIMIZER_NAMES)
    for name, kind in kinds.items():
        assert type(build_optimizer(params, name=name, lr=0.1)) is kind
    with pytest.raises(ConfigError, match="optim.name: must be one of 'adam', 'adamw', 'sgd'"):
        _checked_config(optim={"name": "lamb"})


@pytest.mark.parametrize("environ,launcher", [
    ({}, "single"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_SIZE": "2"}, "deepspeed"),
])
def test_detect_launcher(environ, launcher):
    from largefr.train.distributed_env import detect_launcher

    assert detect_launcher(environ) == launcher


def test_incomplete_launcher_environment_refused():
    from largefr.train.distributed_env import detect_launcher

    with pytest.raises(RuntimeError, match="MASTER_PORT not set"):
        detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


# ---------------------------------------------------------------------------- distributed


def _one_step_updates(rank: int, world: int, runs: list[tuple[int, str]]) -> dict:
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import create_engine, engine_loss_scale
    from largefr.train.head_step import ExternalHeadStep
    from largefr.train.step import StepRunner

    env = init_distributed()
    images, labels = rank_batch(rank, BATCH, NUM_CLASSES)
    results = {}
    for stage, precision in runs:
        backbone = tiny_backbone()
        before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
        head = ShardedArcFace(full_weight(NUM_CLASSES))
        head_before = head.weight.detach().clone()
        config = build_deepspeed_config(micro_batch_size=BATCH, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=stage, precision=precision, gradient_clipping=0.0)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=1.0, momentum=0.0),
                               config)
        head_step = ExternalHeadStep(torch.optim.SGD(head.parameters(), lr=1.0), sharded=[head.weight],
                                     replicated=[], gradient_accumulation_steps=1)
        runner = StepRunner(engine=engine, head=head, head_step=head_step, device=env.device)
        step = runner.step([(images, labels)], lr=1.0, head_lr=1.0)
        after = dict(engine.module.named_parameters())
        results[(stage, precision)] = {"backbone": {n: before[n] - after[n].detach().float() for n in before},
                          "head": head_before - head.weight.detach(), "applied": step.applied,
                          "loss": float(step.loss), "start": head.partition.start,
                          "loss_scale": engine_loss_scale(engine)}
    return results


def test_backbone_and_head_updates_equal_dense_reference_zero_0_1_2():
    world, stages = 2, [0, 1, 2]
    # fp32 at 1e-5; bf16 (ZeRO 1, backbone in bf16, head and loss in fp32) at bf16 resolution
    runs = [(stage, "fp32") for stage in stages] + [(1, "bf16")]
    per_rank = run_distributed(_one_step_updates, world, runs)
    batches = [rank_batch(r, BATCH, NUM_CLASSES) for r in range(world)]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    ref_loss, ref_backbone, ref_weight = dense_reference(tiny_backbone(), full_weight(NUM_CLASSES), images, labels)
    for stage, precision in runs:
        atol = 1e-5 if precision == "fp32" else 3e-2
        for rank, result in enumerate(per_rank):
            got = result[(stage, precision)]
            assert got["applied"], f"ZeRO {stage} rank {rank}: step not applied"
            assert got["loss_scale"] == 1.0  # no loss scaling outside fp16
            assert got["loss"] == pytest.approx(ref_loss, rel=1e-5 if precision == "fp32" else 2e-2)
            for name, grad in ref_backbone.items():
                torch.testing.assert_close(got["backbone"][name].double(), grad, rtol=1e-4, atol=atol,
                                           msg=lambda m: f"ZeRO {stage} rank {rank} {name}: {m}")
            rows = ref_weight[got["start"]:got["start"] + got["head"].shape[0]]
            torch.testing.assert_close(got["head"].double(), rows, rtol=1e-4, atol=atol,
                                       msg=lambda m: f"ZeRO {stage} rank {rank} head rows: {m}")


def _bf16_batchnorm_steps(rank: int, world: int, networks: list[str]) -> dict:
    from largefr.models import get_model
    from largefr.train.engine import create_engine, engine_dtype

    results = {}
    for network in networks:
        torch.manual_seed(0)
        backbone = get_model(network, embedding_size=16, image_size=16)
        config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=1, precision="bf16", gradient_clipping=0.0)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.1), config)
        norms = [m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        before = norms[0].running_var.clone()
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
        loss = engine(images.to(engine_dtype(engine))).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        results[network] = {"loss": float(loss), "param": engine_dtype(engine),
                            "stats": {m.running_mean.dtype for m in norms} | {m.running_var.dtype for m in norms},
                            "stats_moved": not torch.equal(before, norms[0].running_var)}
    return results


def test_bf16_engine_trains_batchnorm_backbones_with_fp32_running_stats():
    # DeepSpeed 0.19.8 casts parameters to bf16 but leaves buffers fp32; a plain BatchNorm then fails on
    # its first forward ("expected scalar type BFloat16 but found Float" on CPU)
    for network, got in run_distributed(_bf16_batchnorm_steps, 1, ["mbf", "r18"])[0].items():
        assert got["param"] == torch.bfloat16, network
        assert got["stats"] == {torch.float32}, network
        assert got["stats_moved"], network
        assert torch.isfinite(torch.tensor(got["loss"])), network
