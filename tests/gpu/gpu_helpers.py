"""What the GPU tests share: the device, one training rank in a fresh process, a small training config.

LARGEFR_GPU_TESTS_ON_CPU=1 runs the tests of test_cuda_acceptance.py on the CPU (gloo, DeepSpeed's CPU
accelerator) to check their wiring on a machine without a GPU; the fp16 cases still need CUDA.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ON_CPU = os.environ.get("LARGEFR_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu") if ON_CPU else torch.device("cuda", 0)
needs_device = pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
"""Environment of a rank that must run on the CPU on a GPU machine (DeepSpeed's CPU accelerator, gloo)."""


def spawn_one_rank(fn, *args, env: dict[str, str] | None = None):
    """fn(0, 1, *args) as one rank in a fresh process (what `python launch/train.py` on one GPU does).

    `env` is added to the child's environment (e.g. CPU_RANK_ENV); the result comes back through a file.
    """
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed_helpers import free_port

    extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
             "LOCAL_RANK": "0", **(env or {})}
    saved = {key: os.environ.get(key) for key in extra}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.pt")
        os.environ.update(extra)
        try:
            process = mp.get_context("spawn").Process(target=_save_result, args=(path, fn, args))
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        process.join(timeout=540)
        assert process.exitcode == 0, f"the rank exited with {process.exitcode}"
        return torch.load(path, weights_only=False)


def _save_result(path: str, fn, args) -> None:
    torch.save(fn(0, 1, *args), path)
    # Saved: skip interpreter finalization, where a process group left open can abort a finished process
    # (as tests/distributed_helpers.py does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_run(rank: int, world: int, config_dict: dict, resume: str | None) -> dict:
    """Build the trainer from the config (as launch/train.py does), train, report step, device and summary."""
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed, shutdown_distributed

    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed(), resume=resume)
    summary = trainer.train()
    trainer.metrics.close()
    shutdown_distributed(wait_for_peers=True)
    return {"summary": summary, "step": trainer.state.step, "device": str(trainer.runner.device)}


def small_run_config(folder, **sections) -> dict:
    """mbf on 16 generated identities at 32 px; `sections` replace keys inside a section."""
    config = {
        "data": {"num_classes": 16, "num_images": 128, "loader": "torch", "image_size": 32, "num_workers": 0,
                 "val_targets": [],
                 "synthetic": {"identities": 16, "images_per_identity": 8, "val_pairs": 20, "seed": 1,
                               "cache_dir": str(folder / "data")}},
        "model": {"network": "mbf", "embedding_size": 16},
        "head": {"scale": 16.0, "margin": 0.3, "sample_rate": 0.5},
        "cluster": {"queue_size": 32, "num_sampled_centers": 8},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"type": "step", "epochs": 4},
        "train": {"batch_size": 4, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": 2},
        "eval": {"every": 0, "batch_size": 16, "nfolds": 2},
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"every": 1, "tensorboard": False},
        "output": str(folder / "run"),
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return config
