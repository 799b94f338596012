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

from largefr.choices import ZERO_STAGES
from tests.distributed_helpers import run_distributed
from tests.test_trainer import tiny_data  # noqa: F401  (fixture: the generated data set)

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
    from largefr.data.prepare import run_on_first_rank

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
    from largefr.train.head_step import NO_HEAD_GRADIENT, ExternalHeadStep

    weight = torch.nn.Parameter(torch.ones(6, 2))
    optimizer = RowSparseAdamW([weight], lr=0.1)
    step = ExternalHeadStep(optimizer, sharded=[weight], replicated=[], gradient_accumulation_steps=2,
                            clip_norm=1.0)
    result = step.step(loss_scale=1.0, engine_step_applied=True, rows=None)  # every micro-batch was non-finite
    assert not result.applied and result.reason == NO_HEAD_GRADIENT and result.grad_norm is None
    assert torch.equal(weight.detach(), torch.ones(6, 2)) and not optimizer.state


def _all_nonfinite_worker(rank: int, world: int) -> dict:
    from largefr.heads.optim import RowSparseSGD
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from largefr.train.head_step import ExternalHeadStep
    from largefr.train.step import StepRunner
    from tests.train_helpers import PoisonedHead, ShardedArcFace, full_weight, rank_batch, tiny_backbone

    init_distributed()
    head = ShardedArcFace(full_weight(5))
    head_nan = PoisonedHead(head, lambda call: True)

    backbone = tiny_backbone()
    gas = 2
    config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=gas, world_size=world,
                                    zero_stage=1, precision="fp32", gradient_clipping=0.0)
    engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.5), config)
    head_optimizer = RowSparseSGD([head.weight], lr=0.5)
    runner = StepRunner(engine=engine, head=head_nan, on_nonfinite="skip",
                        head_step=ExternalHeadStep(head_optimizer, sharded=[head.weight], replicated=[],
                                                   gradient_accumulation_steps=gas))
    before = head.weight.detach().clone()
    result = runner.step([rank_batch(rank, 4, 5, seed=m) for m in range(gas)], lr=0.5, head_lr=0.5)
    return {"applied": result.applied, "nonfinite": result.nonfinite_microbatches, "reason": result.skip_reason,
            "head_unchanged": torch.equal(before, head.weight.detach())}


def test_step_with_every_micro_batch_nonfinite_skips_the_head_step():
    from largefr.train.head_step import NO_HEAD_GRADIENT

    for result in run_distributed(_all_nonfinite_worker, 2):
        assert result == {"applied": False, "nonfinite": 2, "reason": NO_HEAD_GRADIENT, "head_unchanged": True}


# ---------------------------------------------------------------------------- defect 3: resume across device types

SIMULATED_CUDA_STATE = {"device_type": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}  # Philox: seed, offset


def _draws(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=generator)


def _fresh(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cuda_saved_generator_state_reseeds_a_cpu_generator_deterministically():
    from largefr.stateful import restore_generator_state

    first, second, later = _fresh(), _fresh(), _fresh()
    assert not restore_generator_state(first, SIMULATED_CUDA_STATE, step=5)
    assert not restore_generator_state(second, SIMULATED_CUDA_STATE, step=5)
    assert not restore_generator_state(later, SIMULATED_CUDA_STATE, step=6)
    reseeded = _draws(first)
    assert torch.equal(reseeded, _draws(second))  # every resume of this checkpoint draws the same stream
    assert not torch.equal(reseeded, _draws(later)) and not torch.equal(reseeded, _draws(_fresh()))


def test_generator_state_without_device_type_is_typed_by_its_size():
    from largefr.stateful import restore_generator_state

    source = _fresh(3)
    _draws(source)
    legacy_cpu = source.get_state()  # what checkpoints held before the device type was recorded
    target = _fresh()
    assert restore_generator_state(target, legacy_cpu, step=1)
    assert torch.equal(_draws(target), _draws(source))
    assert not restore_generator_state(_fresh(), SIMULATED_CUDA_STATE["state"], step=1)


class CudaGeneratorStandIn:
    """A CUDA generator's interface on CPU: device type cuda, refuses a state of another size."""

    device = torch.device("cuda", 0)

    def __init__(self, seed: int):
        self.seed, self.state = seed, torch.zeros(16, dtype=torch.uint8)

    def initial_seed(self) -> int:
        return self.seed

    def manual_seed(self, seed: int) -> "CudaGeneratorStandIn":
        self.seed = seed
        return self

    def set_state(self, state: torch.Tensor) -> None:
        if state.numel() != 16:
            raise RuntimeError(f"RNG state is wrong size: expected 16, got {state.numel()}")
        self.state = state


def test_cpu_saved_generator_state_reseeds_a_cuda_generator():
    from largefr.stateful import capture_generator_state, reseed_value, restore_generator_state

    saved = capture_generator_state(_fresh())
    assert saved["device_type"] == "cpu"
    generator = CudaGeneratorStandIn(seed=11)
    assert not restore_generator_state(generator, saved, step=4)
    assert generator.seed == reseed_value(11, 4) != reseed_value(11, 5)
    assert restore_generator_state(generator, SIMULATED_CUDA_STATE, step=4)  # same device type: set as saved


def _samplers(trainer) -> dict:
    head = trainer.runner.head
    return {"margin": head.margin_head.sample_generator.get_state(), "center": head.sample_generator.get_state()}


def _train_recording_device(rank: int, world: int, config_dict: dict, device_type: str) -> dict:
    """Train and checkpoint as a run on `device_type` would record its sampling generators."""
    from largefr.config import Config
    from largefr.heads.joint import ClusterGuidedHead
    from largefr.stateful import Kind
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    original = ClusterGuidedHead.checkpoint_state

    def checkpoint_state(self):
        state = original(self)
        if device_type == "cuda":
            state[Kind.PER_RANK]["margin_sampler"] = state[Kind.PER_RANK]["center_sampler"] = SIMULATED_CUDA_STATE
        return state
    ClusterGuidedHead.checkpoint_state = checkpoint_state
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed())
    fresh = _samplers(trainer)
    trainer.train()
    trainer.metrics.close()
    return {"fresh": fresh, "saved": _samplers(trainer)}


def _resumed(rank: int, world: int, config_dict: dict) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed(), resume="auto")
    trainer.metrics.close()
    return {"step": trainer.state.step, **_samplers(trainer)}


@pytest.mark.parametrize("saved_on", ["cuda", pytest.param("cpu", marks=pytest.mark.slow)])  # cpu: also test_trainer
def test_checkpoint_saved_on_either_device_type_resumes_on_cpu(saved_on, tiny_data, tmp_path):
    from tests.test_trainer import tiny_config

    config = tiny_config(tiny_data, str(tmp_path / "run"), train={"zero_stage": 0, "max_steps": 2},
                         head={"sample_rate": 0.5}, data={"val_targets": []}, cluster={"queue_size": 32})
    trained = run_distributed(_train_recording_device, 1, config, saved_on)[0]
    first, again = run_distributed(_resumed, 1, config)[0], run_distributed(_resumed, 1, config)[0]
    assert first["step"] == again["step"] == 2
    for key in ("margin", "center"):
        assert torch.equal(first[key], again[key])  # deterministic: every resume continues alike
        assert not torch.equal(trained["fresh"][key], trained["saved"][key])  # the run drew from both
        if saved_on == "cpu":
            assert torch.equal(first[key], trained["saved"][key])
        else:  # re-seeded for the step: neither the saved stream nor the one a fresh run starts with
            assert not torch.equal(first[key], trained["saved"][key])
            assert not torch.equal(first[key], trained["fresh"][key])


# ---------------------------------------------------------------------------- defect 4: head peak memory on GPU


def test_head_peak_is_the_rise_over_what_was_resident(monkeypatch):
    from largefr.perf import head_bench

    allocated = {"now": 3_000, "peak": 3_000}  # 3000 bytes already resident: GEMM buffers, the other head

    def step():  # the head's step: 700 bytes at its peak, 100 of them kept
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 700)
        allocated["now"] += 100

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    assert head_bench.cuda_peak_increment(step, torch.device("cuda", 0)) == 700
    assert head_bench.peak_increment(allocated_before=3_000, peak_allocated=2_000) == 0


# ---------------------------------------------------------------------------- defect 5: MFU with accumulation


def test_step_flops_count_the_head_of_every_micro_batch(tmp_path):
    from largefr.config import Config
    from largefr.models import model_flops
    from tests.eval_fixtures import load_tool
    from tests.test_trainer import tiny_config

    tool = load_tool("profile_step")
    batch, world, dim, sampled = 8, 2, 16, 5
    flops = {}
    for gas in (1, 3):
        config = Config.from_dict(tiny_config(str(tmp_path), str(tmp_path / "out"),
                                              train={"gradient_accumulation_steps": gas}), world_size=world)
        flops[gas] = tool.config_step_flops(config, world_size=world, momentum_encoder=True, sampled_classes=sampled)
    forward = model_flops("mbf", 32, embedding_size=dim)
    per_micro_batch = 4 * forward * batch + 3 * 2 * (batch * world) * dim * sampled  # backbone x3 + encoder, 3 GEMMs
    assert flops[1] == per_micro_batch and flops[3] == 3 * per_micro_batch


# ---------------------------------------------------------------------------- slow paths


def test_torch_loader_pins_memory_for_a_gpu_run(monkeypatch, tiny_data):
    import largefr.data.torch_loader as torch_loader
    from largefr.data import build_loader

    built = []
    real = torch_loader.DataLoader

    def recording_loader(*args, **kwargs):
        built.append(kwargs.get("pin_memory", False))
        return real(*args, **{**kwargs, "pin_memory": False})  # no GPU here to pin for
    monkeypatch.setattr(torch_loader, "DataLoader", recording_loader)
    for device in ("cuda:0", "cpu"):
        loader = build_loader("torch", rec=tiny_data, batch_size=4, rank=0, world_size=1, num_classes=16,
                              image_size=32, num_workers=0, device=device)
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert built == [True, False]


def test_radial_correction_runs_in_large_blocks_on_a_gpu(monkeypatch):
    from largefr.heads import sharded_head

    cpu_block = sharded_head.radial_block_rows(torch.device("cpu"))
    gpu_block = sharded_head.radial_block_rows(torch.device("cuda", 0))
    assert cpu_block == 128 and gpu_block >= 64 * cpu_block  # 128-row blocks cost ~3 launches each on a GPU
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    grad = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    inv_norm = weight.norm(dim=1).reciprocal()
    expected = grad - (inv_norm**2 * (weight * grad).sum(1)).unsqueeze(1) * weight  # dense, per row
    for block in (7, 300, 4096):  # several blocks with a short last one; one block; one larger than the rows
        monkeypatch.setattr(sharded_head, "radial_block_rows", lambda device, block=block: block)
        corrected = grad.clone()
        sharded_head._remove_radial_component_(corrected, weight, inv_norm)
        torch.testing.assert_close(corrected, expected, rtol=1e-12, atol=1e-12)


def test_bf16_reduces_gradients_in_fp32_unless_the_user_says_otherwise():
    from largefr.train.engine import build_deepspeed_config

    common = dict(micro_batch_size=4, gradient_accumulation_steps=1, world_size=2, zero_stage=1,
                  gradient_clipping=0.0)
    assert build_deepspeed_config(precision="bf16", **common)["communication_data_type"] == "fp32"
    assert "communication_data_type" not in build_deepspeed_config(precision="fp32", **common)
    user = build_deepspeed_config(precision="bf16", user_section={"communication_data_type": "bf16"}, **common)
    assert user["communication_data_type"] == "bf16"


def _engine_reduction_dtypes(rank: int, world: int) -> dict:
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from tests.train_helpers import tiny_backbone

    init_distributed()
    out = {}
    for stage in ZERO_STAGES:
        backbone = tiny_backbone()
        config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=1, world_size=world,
                                        zero_stage=stage, precision="bf16", gradient_clipping=0.0)
        engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.1), config)
        out[stage] = str(engine.communication_data_type)
    return out


def test_bf16_engines_reduce_gradients_in_fp32():
    for result in run_distributed(_engine_reduction_dtypes, 2):
        assert result == {0: "torch.float32", 1: "torch.float32", 2: "torch.float32"}
