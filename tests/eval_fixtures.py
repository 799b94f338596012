"""Artifacts shared by the evaluation tests, built once per test process.

- `synthetic_data()`: a small synthetic data set (train.rec + synth_val.bin), `generate_dataset`.
- `quickstart_checkpoint()`: a real short training run: configs/quickstart.json (mbf, embedding
  128, ArcFace head, cluster terms, Adam, 112 x 112) shrunk to this data set, a batch of 4 and
  TRAIN_STEPS steps, trained by `build_trainer(...).train()` on 1 gloo rank; its final checkpoint
  is the one the tools load with --checkpoint.
  After so few steps BatchNorm's running statistics are still near their initial values and in
  eval mode every image maps to nearly the same direction (all cosines ~1 to 1e-7): the tools run
  on that checkpoint, but the brute-force comparisons could not tell a right evaluation from a wrong
  one there. So `weights` is the same backbone with its BatchNorm statistics re-estimated on the
  training images ("precise BN", no weight changes), as a plain state_dict file for --weights.

The machine running the tests has few cores: sizes are kept small (mbf at 112 x 112 costs tens of ms
per image on a busy CPU).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK, EMBEDDING_SIZE = "mbf", 128  # configs/quickstart.json's model
IDENTITIES, IMAGES_PER_IDENTITY, PAIRS, SEED = 6, 4, 10, 0
TRAIN_STEPS, BATCH = 6, 4


@functools.cache
def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="largefr-eval-tests-")
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def synthetic_data() -> str:
    """Folder with train.rec/idx/property and synth_val.bin (PAIRS pairs)."""
    from largefr.data.synthetic import generate_dataset

    folder = os.path.join(_scratch(), "synthetic")
    generate_dataset(folder, identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY, pairs=PAIRS,
                     seed=SEED, progress=False)
    return folder


@dataclass(frozen=True)
class QuickstartCheckpoint:
    root: str
    """Checkpoint root of the run (holds step_<TRAIN_STEPS>/)."""
    step_dir: str
    weights: str
    """Plain state_dict of the run's backbone with re-estimated BatchNorm statistics (see the module docstring)."""


def quickstart_config(data_dir: str, output: str) -> dict:
    """configs/quickstart.json with the data, batch, step count and evaluation shrunk for a test."""
    with open(os.path.join(ROOT, "configs", "quickstart.json")) as handle:
        config = json.load(handle)
    config["data"].update(num_classes=IDENTITIES, num_images=IDENTITIES * IMAGES_PER_IDENTITY, loader="torch",
                          num_workers=0, rec=data_dir, synthetic=None,
                          image_size=112)  # the evaluation tools work on aligned 112 x 112 faces
    config["cluster"].update(queue_size=32, num_sampled_centers=4)
    config["train"].update(batch_size=BATCH, max_steps=TRAIN_STEPS)
    config["eval"].update(every=0, batch_size=2 * PAIRS, nfolds=2)
    config["checkpoint"].update(every=0, keep_last=1)
    config["logging"] = {"every": TRAIN_STEPS, "tensorboard": False}
    config["output"] = output
    return config


def _train_quickstart(rank: int, world: int, data_dir: str, output: str) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    config = Config.from_dict(quickstart_config(data_dir, output), world_size=world)
    trainer = build_trainer(config, init_distributed())
    summary = trainer.train()
    trainer.metrics.close()
    return summary


def _precise_batchnorm(model: torch.nn.Module, data_dir: str) -> None:
    """Running statistics = exact means over the training images (one pass in train mode, no grad)."""
    from largefr.data import build_loader

    loader = build_loader("torch", rec=data_dir, batch_size=BATCH, rank=0, world_size=1, num_classes=IDENTITIES,
                          num_workers=0, shuffle=False, random_flip=False, drop_last=False,
                          cache_dir=os.path.join(_scratch(), "index-cache"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


@functools.cache
def quickstart_checkpoint() -> QuickstartCheckpoint:
    from largefr.eval.weights import load_backbone
    from tests.distributed_helpers import run_distributed

    output = os.path.join(_scratch(), "quickstart")
    summary = run_distributed(_train_quickstart, 1, synthetic_data(), output)[0]
    assert summary["steps"] == TRAIN_STEPS, summary
    root = os.path.join(output, "checkpoints")
    loaded = load_backbone(checkpoint=root)
    _precise_batchnorm(loaded.model, synthetic_data())
    weights = os.path.join(_scratch(), "model_precise_bn.pt")
    torch.save(loaded.model.state_dict(), weights)
    return QuickstartCheckpoint(root=root, step_dir=loaded.source, weights=weights)


def load_tool(name: str):
    """The module of tools/<name>.py (tools/ is not a package)."""
    import importlib.util

    path = os.path.join(ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"largefr_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
