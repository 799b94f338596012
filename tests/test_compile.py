"""train.compile / train.channels_last: compiled modules compute what eager ones do; a failing compile backend
falls back to eager with one warning, in forward or backward lowering, and inside a real training run."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from largefr.train.compile import EagerFallback, use_channels_last
from tests.distributed_helpers import run_distributed

FAILING_BACKEND = "largefr_test_failing"


def _failing_backend(graph, example_inputs):
    raise RuntimeError("forced compile failure")


def _register_failing_backend() -> None:
    from torch._dynamo import list_backends, register_backend

    if FAILING_BACKEND not in list_backends(exclude_tags=()):
        register_backend(name=FAILING_BACKEND)(_failing_backend)


class _Net(nn.Module):
    """A module of its own (dynamo does not compile a bare torch.nn container: its code is torch's)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                                    nn.Linear(4 * 6 * 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _forward_backward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(images)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_failing_backend_runs_eagerly_with_one_warning():
    images = torch.randn(2, 3, 8, 8)
    reference_out, reference_grads = _forward_backward(_net(), images)
    model, fallback = _net(), EagerFallback(_failing_backend)
    model.compile(backend=fallback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (images, torch.randn(3, 3, 8, 8), images):  # a second shape: a second graph, no second warning
            out, grads = _forward_backward(model, batch)
    assert [str(w.message) for w in caught if "train.compile" in str(w.message)] == [
        "train.compile: torch.compile (backend <function _failing_backend at "
        f"{hex(id(_failing_backend))}>) failed, the backbone runs eagerly: RuntimeError: forced compile failure"]
    torch.testing.assert_close(out, reference_out, rtol=0, atol=0)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


def test_a_backward_that_fails_to_lower_is_caught_at_the_forward():
    """AOTAutograd lowers the backward lazily, at the first backward; the fallback makes it lower it now."""
    from torch._dynamo.backends.common import aot_autograd

    def fails_on_backward(graph, example_inputs):
        raise RuntimeError("forced backward lowering failure")

    model = _net()
    fallback = EagerFallback(aot_autograd(fw_compiler=lambda g, _: g.forward, bw_compiler=fails_on_backward))
    model.compile(backend=fallback)
    with pytest.warns(RuntimeWarning, match="forced backward lowering failure"):
        _forward_backward(model, torch.randn(2, 3, 8, 8))
    assert fallback.failure == "RuntimeError: forced backward lowering failure"


def test_working_backend_matches_eager():
    images = torch.randn(2, 3, 8, 8)
    reference_out, reference_grads = _forward_backward(_net(), images)
    model, fallback = _net(), EagerFallback("aot_eager")
    model.compile(backend=fallback)
    out, grads = _forward_backward(model, images)
    assert fallback.failure is None
    torch.testing.assert_close(out, reference_out, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_channels_last_feeds_nhwc_and_changes_nothing_computed():
    seen = []
    model = _net()
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(images)
        use_channels_last(model)
        torch.testing.assert_close(model(images), expected)
    assert seen == [False, True]


# ---------------------------------------------------------------------------- in a training run


def _train(rank: int, world: int, overrides: dict) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    _register_failing_backend()
    config = {
        "data": {"loader": "synthetic", "num_classes": 8, "num_images": 64, "image_size": 32},
        "model": {"network": "mbf", "embedding_size": 16},
        "cluster": {"queue_size": 64, "num_sampled_centers": 8},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "train": {"batch_size": 8, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": 3},
        "eval": {"every": 0}, "checkpoint": {"every": 0},
        "logging": {"every": 1, "tensorboard": False, "log_file": False}, "output": overrides.pop("output"),
    }
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(Config.from_dict(config, world_size=world), init_distributed())
        trainer.loss_history = []
        trainer.train()
    trainer.metrics.close()
    return {"losses": [float(x) for x in trainer.loss_history],
            "warnings": [str(w.message) for w in caught if "train.compile" in str(w.message)],
            "compiled": trainer.runner.engine.is_compiled}


@pytest.mark.slow  # ~2 min on 2 cores: dynamo traces the backbone and the momentum encoder before falling back
def test_a_failing_compile_trains_eagerly_with_one_warning(tmp_path):
    """Real DeepSpeed engine and momentum encoder, both compiled through the forced-failing backend: the run
    ends, with one warning and the losses of the eager run."""
    result, = run_distributed(_train, 1, {"output": str(tmp_path / "run"),
                                          "train": {"compile": True, "compile_backend": FAILING_BACKEND,
                                                    "channels_last": True}})
    eager, = run_distributed(_train, 1, {"output": str(tmp_path / "eager"),
                                         "train": {"channels_last": True}})  # the same layout: the same kernels
    assert result["compiled"] and not eager["compiled"]
    assert len(result["warnings"]) == 1 and "forced compile failure" in result["warnings"][0]
    assert eager["warnings"] == []
    assert len(result["losses"]) == 3
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=1e-5)
