"""Fine-tuning from an export against training from scratch, and the checkpoint naming rule of every tool.

The fine-tune test: train a small model on data set A, export its backbone with tools/export_backbone.py
(given the run folder), fine-tune from that file on data set B (other identities) with
head.init=class_mean, and train the same steps on B from scratch. The fine-tune's first losses are far
below the scratch run's, and verification on B's held-out identities after the same steps is higher.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from largefr.checkpoint.save_load import CheckpointError, locate_checkpoint
from tests.distributed_helpers import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE, EMB = 32, 16


# ---------------------------------------------------------------------------- checkpoint naming


def test_naming_errors_say_what_was_found(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=rf"{missing}: no such folder; name a run folder, its checkpoints/ "
                                              r"folder or one step_<N> folder"):
        locate_checkpoint(missing)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "train.log").write_text("")
    with pytest.raises(CheckpointError, match=r"run: holds no checkpoint \(found: config.json, train.log\)"):
        locate_checkpoint(str(run))
    (run / "checkpoints" / "step_4").mkdir(parents=True)  # interrupted: no manifest
    for named in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=r"checkpoints: holds 1 step_<N> folder\(s\), none complete "
                                                  r"\(step_4: has no manifest.json: it was interrupted"):
            locate_checkpoint(str(named))
    with pytest.raises(CheckpointError, match=r"step_4 has no manifest.json: it was interrupted while being written"):
        locate_checkpoint(str(run / "checkpoints" / "step_4"))


# ---------------------------------------------------------------------------- fine-tune vs scratch


def _config(data: str, output: str, steps: int, **sections) -> dict:
    config = {
        "data": {"rec": data, "loader": "torch", "image_size": SIDE, "num_workers": 0, "val_targets": ["synth_val"]},
        "model": {"network": "mbf", "embedding_size": EMB},
        "head": {"scale": 16.0, "margin": 0.3},
        "cluster": {"queue_size": 64, "num_sampled_centers": 8},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"type": "step", "epochs": 100},
        "train": {"batch_size": 16, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": steps},
        "eval": {"every": 0, "batch_size": 32, "nfolds": 2},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"every": 1, "tensorboard": False},
        "output": output,
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return config


def _train(rank: int, world: int, config_dict: dict) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), env)
    trainer.loss_history = []
    summary = trainer.train()
    trainer.metrics.close()
    return {"losses": [float(x) for x in trainer.loss_history], "summary": summary}


def _export(run_folder: str, out: str) -> None:
    result = subprocess.run([sys.executable, "tools/export_backbone.py", "--checkpoint", run_folder, "--out", out],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr


PRETRAIN_STEPS, STEPS, FIRST = 60, 12, 3


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fine_tune_from_an_export_beats_scratch_on_other_identities(tmp_path):
    from largefr.data.synthetic import generate_dataset

    data_a, data_b = str(tmp_path / "a"), str(tmp_path / "b")
    generate_dataset(data_a, identities=40, images_per_identity=16, pairs=200, image_size=SIDE, seed=11, progress=False)
    generate_dataset(data_b, identities=24, images_per_identity=8, pairs=200, image_size=SIDE, seed=12, progress=False)
    # one rank of 16 images pre-trains; fine-tune and scratch run on 2 ranks of 8 (the same global batch)
    pretrained = run_distributed(_train, 1, _config(data_a, str(tmp_path / "pre"), PRETRAIN_STEPS))[0]
    weights = str(tmp_path / "model.pt")
    _export(str(tmp_path / "pre"), weights)  # the run folder names its latest checkpoint
    tuned = run_distributed(_train, 2, _config(data_b, str(tmp_path / "tuned"), STEPS, train={"batch_size": 8},
                                               model={"init_from": weights}, head={"init": "class_mean"}))[0]
    scratch = run_distributed(_train, 2, _config(data_b, str(tmp_path / "scratch"), STEPS, train={"batch_size": 8}))[0]
    numbers = {
        "pretrain_final_loss": pretrained["losses"][-1],
        "tuned_first_losses": tuned["losses"][:FIRST], "scratch_first_losses": scratch["losses"][:FIRST],
        "tuned_verification": tuned["summary"]["verification"]["synth_val"],
        "scratch_verification": scratch["summary"]["verification"]["synth_val"],
        "tuned_verification_at_start": tuned["summary"]["verification_at_start"]["synth_val"],
    }
    print("fine-tune vs scratch:", json.dumps(numbers))
    (tmp_path / "numbers.json").write_text(json.dumps(numbers))
    assert sum(tuned["losses"][:FIRST]) < 0.7 * sum(scratch["losses"][:FIRST]), numbers  # measured: 0.54
    assert numbers["tuned_verification"] > numbers["scratch_verification"], numbers
