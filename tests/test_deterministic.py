"""train.deterministic on the real trainer: the flag is in effect during the run, and two runs match bit for bit.

One gloo rank, a DeepSpeed engine, MobileFaceNet at 32x32 on a generated data set read by the torch loader
with two worker processes and augmentation on (so the loader's per-(seed, epoch, rank, position) seeding is
part of what must repeat), all cluster terms and Partial FC sampling on.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed_helpers import run_distributed

AUGMENT = {"crop_prob": 0.5, "jitter_prob": 0.5, "brightness": [0.8, 1.2], "erase_prob": 0.3}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    from largefr.data.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("deterministic") / "data"
    generate_dataset(folder, identities=16, images_per_identity=8, pairs=20, image_size=32, seed=1, progress=False)
    return str(folder)


def _config(data_dir: str, output: str, deterministic: bool) -> dict:
    return {
        "data": {"rec": data_dir, "num_classes": 16, "num_images": 128, "loader": "torch", "image_size": 32,
                 "num_workers": 2, "augment": AUGMENT},
        "model": {"network": "mbf", "embedding_size": 16},
        "head": {"scale": 16.0, "margin": 0.3, "sample_rate": 0.5},
        "cluster": {"queue_size": 64, "num_sampled_centers": 8},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"type": "step", "epochs": 4},
        "train": {"batch_size": 8, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": 4,
                  "deterministic": deterministic},
        "eval": {"every": 0, "batch_size": 16, "nfolds": 2},
        "checkpoint": {"every": 0},
        "logging": {"every": 1, "tensorboard": False, "log_file": False},
        "output": output,
    }


def _run(config_dict: dict) -> dict:
    """Train; record the deterministic-algorithms flag at every step and the final weights."""
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    trainer = build_trainer(Config.from_dict(config_dict, world_size=1), init_distributed())
    flags = []
    take_step = trainer.run_step

    def step_recording_the_flag(micro_batches):
        flags.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return take_step(micro_batches)
    trainer.run_step = step_recording_the_flag
    initial = {k: v.detach().clone() for k, v in trainer.runner.engine.module.state_dict().items()}
    trainer.train()
    trainer.metrics.close()
    return {"flags": flags, "initial": initial, "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "backbone": {k: v.detach().clone() for k, v in trainer.runner.engine.module.state_dict().items()},
            "head": trainer.runner.head.margin_head.weight.detach().clone()}


def _two_deterministic_runs_and_one_plain(rank: int, world: int, data: str, output: str) -> list[dict]:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    runs = [_run(_config(data, f"{output}/det{i}", deterministic=True)) for i in range(2)]
    return runs + [_run(_config(data, f"{output}/plain", deterministic=False))]


@pytest.fixture
def restored_flags(monkeypatch):
    """The process-wide flags set_determinism changes, put back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


@pytest.mark.parametrize("user_cublas,expected_cublas", [(None, ":4096:8"), (":16:8", ":16:8")])
def test_set_determinism_sets_torch_cudnn_and_cublas_and_turns_off_again(restored_flags, monkeypatch,
                                                                          user_cublas, expected_cublas):
    from largefr.train.build import set_determinism

    if user_cublas is not None:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", user_cublas)
    torch.backends.cudnn.benchmark = True
    set_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == expected_cublas  # the user's value is kept
    set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


@pytest.mark.slow  # three short trainings: 206 s on the shared 2-core machine while other jobs ran
def test_deterministic_flag_is_in_effect_and_two_runs_give_identical_weights(tiny_data, tmp_path):
    first, second, plain = run_distributed(_two_deterministic_runs_and_one_plain, 1, tiny_data, str(tmp_path))[0]
    assert first["flags"] == [(True, True)] * 4 and second["flags"] == [(True, True)] * 4
    assert first["cublas"] == ":4096:8"
    assert plain["flags"] == [(False, False)] * 4  # set from each run's config, not left over from the last
    assert first["backbone"].keys() == second["backbone"].keys()
    for name, value in first["backbone"].items():
        assert torch.equal(value, second["backbone"][name]), name
    assert torch.equal(first["head"], second["head"])
    moved = [name for name, value in first["backbone"].items() if not torch.equal(value, first["initial"][name])]
    assert len(moved) > len(first["backbone"]) // 2  # the runs trained: most tensors left their initial values
