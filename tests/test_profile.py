"""tools/profile_step.py and largefr.perf.profiling: phase timing of real training steps."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from largefr.perf.profiling import (
    PhaseTimer,
    mark_backward,
    peak_tflops,
    step_flops,
)
from largefr.train.phases import NULL_TIMER
from tests.distributed_helpers import run_distributed
from tests.eval_fixtures import load_tool
from tests.test_trainer import tiny_config, tiny_data  # noqa: F401  (tiny_data is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a backward of known length."""

    @staticmethod
    def forward(ctx, tensor, seconds):
        ctx.seconds = seconds
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


def test_phases_are_exclusive_and_nested_time_goes_to_the_child():
    timer = PhaseTimer("cpu")
    with timer.phase("outer"):
        time.sleep(0.05)
        with timer.phase("inner"):
            time.sleep(0.10)
    assert timer.totals["inner"] == pytest.approx(0.10, abs=0.04)
    assert timer.totals["outer"] == pytest.approx(0.05, abs=0.04)


def test_cpu_time_counts_work_since_the_reset_not_sleep():
    timer = PhaseTimer("cpu")
    sum(range(2_000_000))  # before the reset: not counted
    timer.reset()
    time.sleep(0.2)
    slept = timer.cpu_seconds()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert slept < 0.1 and timer.cpu_seconds() >= 0.1


def test_backward_marks_charge_each_backward_segment_to_its_phase():
    timer = PhaseTimer("cpu")
    x = torch.ones(3, requires_grad=True)
    base = _SlowBackward.apply(x, 0.10)  # "backbone": runs last in backward
    base = mark_backward(base, timer, "backbone_backward")
    loss = mark_backward(_SlowBackward.apply(base, 0.15).sum(), timer, "loss_a")
    with timer.phase("backward"):
        loss.backward()
    assert timer.totals["loss_a"] == pytest.approx(0.15, abs=0.05)
    assert timer.totals["backbone_backward"] == pytest.approx(0.10, abs=0.05)
    assert timer.totals.get("backward", 0.0) < 0.03
    assert torch.equal(x.grad, torch.ones(3))  # the marks do not change gradients


def test_null_timer_is_a_shared_no_op():
    assert NULL_TIMER.phase("a") is NULL_TIMER.phase("b")
    assert NULL_TIMER.switch("a") is None and not NULL_TIMER.enabled


def test_peak_rates_and_flops():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5)
    assert peak_tflops("NVIDIA H200", "fp32") == pytest.approx(67.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == pytest.approx(312.0)
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_tflops("Some CPU", "fp32") is None
    flops = step_flops(backbone_forward_flops=10, local_batch=4, momentum_encoder=True, global_batch=8,
                       embedding_size=3, sampled_classes=5)
    assert flops == 4 * 10 * 4 + 6 * 8 * 3 * 5


@pytest.fixture(scope="module")
def tiny_config_path(tiny_data, tmp_path_factory) -> str:  # noqa: F811  (tiny_data is the imported fixture)
    folder = tmp_path_factory.mktemp("profile")
    path = folder / "tiny.json"
    path.write_text(json.dumps(tiny_config(tiny_data, str(folder / "out"), data={"val_targets": []})))
    return str(path)


def test_profile_tool_reports_every_phase_summing_to_the_step(tiny_config_path, tmp_path):
    tool = load_tool("profile_step")
    report_path, png_path = tmp_path / "p.json", tmp_path / "p.png"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "profile_step.py"), "--config", tiny_config_path,
                           "--steps", "3", "--warmup", "1", "--json", str(report_path), "--png", str(png_path)],
                          capture_output=True, text=True, env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data wait" in done.stdout
    report = json.loads(report_path.read_text())
    phases = report["phases_seconds"]
    assert list(phases) == list(tool.PHASES)
    assert all(seconds >= 0.0 for seconds in phases.values())
    for name in ("data_wait", "momentum_forward", "backbone_forward", "loss_cg", "loss_con", "loss_ali",
                 "backbone_backward", "optimizer_engine", "optimizer_head", "ema_update"):
        assert phases[name] > 0.0, name  # the tiny config turns every cluster term on
    assert sum(phases.values()) == pytest.approx(report["step_seconds"], rel=0.2)
    assert report["images_per_sec"] == pytest.approx(8 / report["step_seconds"], rel=1e-6)
    assert report["ranks"][0]["peak_memory_bytes"] > 0
    assert 0 < report["ranks"][0]["cpu_seconds"]
    assert report["mfu"] is None  # CPU
    if importlib.util.find_spec("matplotlib") is not None:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trained_and_profiled_losses(rank: int, world: int, config_dict: dict) -> dict:
    """The losses of 4 steps of Trainer.train, and of 1 + 3 profiled steps of a second, identical trainer."""
    from largefr.config import Config
    from largefr.perf.profiling import profile_steps
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    losses = {}
    for name in ("trained", "profiled"):
        config = Config.from_dict({**config_dict, "output": f"{config_dict['output']}/{name}"}, world_size=world)
        trainer = build_trainer(config, env)
        trainer.loss_history = []
        if name == "trained":
            trainer.train()
        else:
            profile_steps(trainer, PhaseTimer(env.device), steps=3, warmup=1)
            assert trainer.runner.phase_timer is NULL_TIMER  # profiling off again afterwards
        trainer.metrics.close()
        losses[name] = [float(loss) for loss in trainer.loss_history]
    return losses


def test_profiled_steps_are_the_trainers_own_steps(tiny_data, tmp_path):  # noqa: F811
    """Same data order, learning rates and warm-up as the loop: the profiled losses equal the trained ones.

    cluster.warmup_steps makes every step's loss depend on the step number the profiler keeps."""
    config = tiny_config(tiny_data, str(tmp_path / "out"), data={"val_targets": []}, train={"max_steps": 4},
                         cluster={"warmup_steps": 4})
    for losses in run_distributed(_trained_and_profiled_losses, 2, config):
        assert len(losses["trained"]) == 4
        assert losses["profiled"] == pytest.approx(losses["trained"], rel=1e-6, abs=1e-7)


_MISSING = object()


def _largefr_module_attributes() -> dict[str, dict[str, object]]:
    """Every attribute of every loaded largefr module but the profiler's own, by module name."""
    return {name: dict(vars(module)) for name, module in list(sys.modules.items())
            if name.startswith("largefr") and module is not None and name != "largefr.perf.profiling"}


def _changed_attributes(before: dict[str, dict[str, object]]) -> set[str]:
    """'module.attribute' of each attribute in `before` that is now another object or gone."""
    changed = set()
    for name, attributes in before.items():
        now = vars(sys.modules[name])
        changed.update(f"{name}.{key}" for key, value in attributes.items() if now.get(key, _MISSING) is not value)
    return changed


def _module_changes_while_profiling(rank: int, world: int, config_dict: dict) -> list[str]:
    """The largefr module attributes that differ from before, looked at whenever a profiled step enters a phase
    (so a change undone at the end is seen too) and after the run."""
    from largefr.config import Config
    from largefr.perf.profiling import profile_steps
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), env)
    before, changed = _largefr_module_attributes(), set()

    class WatchingTimer(PhaseTimer):
        def phase(self, name: str):
            changed.update(_changed_attributes(before))
            return super().phase(name)

    profile_steps(trainer, WatchingTimer(env.device), steps=2, warmup=1)
    changed.update(_changed_attributes(before))
    trainer.metrics.close()
    return sorted(changed)


def test_profiler_changes_no_attribute_of_another_module(tiny_data, tmp_path):  # noqa: F811
    config = tiny_config(tiny_data, str(tmp_path / "out"), data={"val_targets": []}, train={"max_steps": 4})
    [changes] = run_distributed(_module_changes_while_profiling, 1, config)
    assert changes == []


def test_no_tool_shadows_a_standard_library_module():
    """A script's folder comes first on sys.path: a tool named profile.py once hid the standard library's `profile`."""
    tools = {name[:-3] for name in os.listdir(os.path.join(ROOT, "tools")) if name.endswith(".py")}
    assert sorted(tools & set(sys.stdlib_module_names)) == []
