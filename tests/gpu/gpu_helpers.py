"""What the GPU tests share: the device, one training rank in a fresh process, a small training config.

LARGEFR_GPU_TESTS_ON_CPU=1 runs the tests marked `needs_device` on the CPU (gloo, DeepSpeed's CPU
accelerator) to check their logic on a machine without a GPU, fp16 included (allow_fp16_on_the_cpu_stand_in).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import pytest
import torch

ON_CPU = os.environ.get("LARGEFR_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu") if ON_CPU else torch.device("cuda", 0)
needs_device = pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
"""Environment of a rank that must run on the CPU on a GPU machine (DeepSpeed's CPU accelerator, gloo)."""


SPAWN_TIMEOUT_S = 150
"""Seconds a spawned rank may run (below the GPU step's 240 s, so a hung rank fails its test, not the step)."""


def spawn_one_rank(fn, *args, env: dict[str, str] | None = None):
    """fn(0, 1, *args) as one rank in a fresh process (what `python launch/train.py` on one GPU does).

    `env` is added to the child's environment (e.g. CPU_RANK_ENV); the result comes back through a file.
    """
    return spawn_ranks(fn, 1, *args, env=env)[0]


def spawn_ranks(fn, world: int, *args, env: dict[str, str] | None = None) -> list:
    """fn(rank, world, *args) on `world` fresh processes with one rendezvous (RANK, WORLD_SIZE, MASTER_*).

    The ranks cannot outlive the test: whatever ends the wait (a rank's failure, SPAWN_TIMEOUT_S, the
    test's own timeout raising here), every rank still alive is killed before this returns or raises.
    They stay in the test's process group, so the acceptance script's step timeout reaches them too.
    """
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed_helpers import free_port

    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world), **(env or {})}
    with tempfile.TemporaryDirectory() as folder:
        processes = []
        try:
            for rank in range(world):
                with _environment({**common, "RANK": str(rank), "LOCAL_RANK": "0"}):
                    path = os.path.join(folder, f"rank{rank}.pt")
                    processes.append(mp.get_context("spawn").Process(target=_save_result, args=(path, fn, rank,
                                                                                                world, args)))
                    processes[-1].start()
            _wait_all(processes, SPAWN_TIMEOUT_S)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)
        codes = [process.exitcode for process in processes]
        assert codes == [0] * world, (f"the ranks exited with {codes} (-9: killed here after {SPAWN_TIMEOUT_S} s "
                                      "or when another rank failed)")
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]


def _wait_all(processes: list, timeout_s: float) -> None:
    """Until every process ended, one failed (the others would wait for it forever) or `timeout_s` passed."""
    import time
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    while True:
        running = [process for process in processes if process.exitcode is None]
        failed = any(process.exitcode not in (None, 0) for process in processes)
        left = deadline - time.monotonic()
        if not running or failed or left <= 0:
            return
        wait([process.sentinel for process in running], timeout=left)  # wakes when one of them ends


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block and restored after (a spawned child copies it at start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def allow_fp16_on_the_cpu_stand_in() -> None:
    """On the CPU stand-in (ON_CPU), tell DeepSpeed's CPU accelerator that fp16 is supported; no-op elsewhere.

    The accelerator asks oneDNN whether this CPU has fp16 hardware and refuses fp16 without it, but torch
    computes fp16 on any CPU (slowly) in the same IEEE range as a GPU: the loss scaling, the head's
    unscaling and the overflow skip of the fp16 tests then run here before a GPU sees them.
    """
    if not ON_CPU:
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        type(accelerator).is_fp16_supported = lambda self: True


def _save_result(path: str, fn, rank: int, world: int, args) -> None:
    torch.save(fn(rank, world, *args), path)
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
