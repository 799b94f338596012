"""Resume compares the checkpoint's config with the current one before loading anything
(largefr/checkpoint/resume_config.py), and a forged tensor of another shape is named with its file and key.

The table's messages are checked on config dicts (fast); real resumes on 2 ranks check that every rank refuses
alike, that a free change (optim.lr) and an optimizer change under checkpoint.reset_optimizer resume, and the
forged queue and engine tensors (docs/RELIABILITY.md, 'Resume with a changed config').
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from largefr.checkpoint.files import file_digest, safe_load
from largefr.checkpoint.resume_config import (RESUME_RULES, WHOLE_SECTION, Rule, check_resume_config, flatten,
                                              rule_of)
from largefr.checkpoint.save_load import CheckpointError
from largefr.config import Config
from tests.test_reliability_faults import Ranks, fast_config
from tests.test_trainer import tiny_data  # noqa: F401  (a fixture)

PATH = "/runs/a/checkpoints/step_40"


def _config(**sections) -> dict:
    data = {"data": {"rec": "/data/ms1m", "num_classes": 100, "num_images": 5000}, "output": "/tmp/run",
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "train": {"precision": "fp32"}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return Config.from_dict(data).to_dict()


def test_every_config_key_has_exactly_one_resume_rule():
    keys = flatten(_config())
    assert [key for key in keys if rule_of(key) is None] == []  # a new config key must be placed in the table
    stale = [entry for entry in RESUME_RULES if not entry.endswith(WHOLE_SECTION) and entry not in keys]
    sections = [entry[:-len(WHOLE_SECTION)] for entry in RESUME_RULES if entry.endswith(WHOLE_SECTION)]
    assert stale == [] and all(any(key.startswith(f"{s}.") for key in keys) for s in sections)


CHANGES = {  # change -> the rule its message must give
    "optim.name": ({"optim": {"name": "adamw"}}, r"optim.name='sgd', this run has 'adamw' \(shapes the optimizer "
                   r"state: .*add --set checkpoint.reset_optimizer=true"),
    "optim.momentum to 0": ({"optim": {"momentum": 0.0}}, r"optim.momentum=0.9, this run has 0.0 \(shapes the "
                            "optimizer state"),
    "train.precision": ({"train": {"precision": "bf16"}}, r"train.precision='fp32', this run has 'bf16' \(shapes the "
                        rf"saved model state: .*--set model.init_from={PATH}\)"),
    "cluster.queue_size": ({"cluster": {"queue_size": 4096}}, r"cluster.queue_size=8192, this run has 4096 \(shapes"),
    "head.type": ({"head": {"type": "cosface", "margin": 0.35}}, r"head.type='arcface', this run has 'cosface'"),
    "model.embedding_size": ({"model": {"embedding_size": 256}}, r"model.embedding_size=512, this run has 256"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_change_that_cannot_be_resumed_is_named(case):
    change, message = CHANGES[case]
    with pytest.raises(CheckpointError, match=rf"checkpoint {PATH} was written with .*{message}"):
        check_resume_config(PATH, _config(), _config(**change), reset_optimizer=False)


def test_every_difference_is_named_at_once_and_free_changes_are_returned():
    current = _config(optim={"name": "adam", "lr": 0.01}, train={"precision": "bf16", "max_steps": 9},
                      cluster={"queue_size": 4096})
    with pytest.raises(CheckpointError) as caught:
        check_resume_config(PATH, _config(), current, reset_optimizer=False)
    for key in ("cluster.queue_size=8192, this run has 4096", "train.precision='fp32'", "optim.name='sgd'"):
        assert key in str(caught.value)
    assert "optim.lr" not in str(caught.value) and "max_steps" not in str(caught.value)
    changed = check_resume_config(PATH, _config(), _config(optim={"lr": 0.01, "momentum": 0.5},
                                                           train={"max_steps": 9, "world": 4}), reset_optimizer=False)
    assert [(d.key, d.rule) for d in changed] == [("optim.lr", Rule.FREE), ("optim.momentum", Rule.FREE),
                                                   ("train.max_steps", Rule.FREE), ("train.world", Rule.FREE)]


def test_reset_optimizer_accepts_an_optimizer_change_only():
    changed = check_resume_config(PATH, _config(), _config(optim={"name": "adamw"}), reset_optimizer=True)
    assert [(d.key, d.rule) for d in changed] == [("optim.name", Rule.OPTIMIZER)]
    with pytest.raises(CheckpointError, match="train.precision='fp32', this run has 'bf16'"):
        check_resume_config(PATH, _config(), _config(optim={"name": "adamw"}, train={"precision": "bf16"}),
                            reset_optimizer=True)


# ---------------------------------------------------------------------------- real resumes on 2 ranks


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("trained")
    config = fast_config(tiny_data, str(folder / "out"), train={"max_steps": 2, "collective_timeout_s": 30})
    ranks = Ranks(folder, config)
    assert ranks.wait(150) == [0, 0], ranks.output(0)[-3000:]
    return folder / "out", config


def _resume(trained, tmp_path, sections: dict, max_steps: int = 3) -> tuple[Ranks, list[int]]:
    output = tmp_path / "out"
    shutil.copytree(trained[0], output)
    config = {**trained[1], "output": str(output)}
    for section, values in {"train": {"max_steps": max_steps}, **sections}.items():
        config[section] = {**config[section], **values}
    ranks = Ranks(tmp_path, config, args=("--resume", "auto"))
    return ranks, ranks.wait(150)


def _assert_refused_everywhere(ranks: Ranks, codes: list[int], expected: str) -> None:
    for rank in range(2):
        assert codes[rank] == 1 and f"[rank {rank}] error: " in ranks.output(rank), ranks.output(rank)[-3000:]
        assert expected in ranks.output(rank) and "Traceback" not in ranks.output(rank), ranks.output(rank)[-3000:]


@pytest.mark.slow
def test_an_optimizer_change_is_refused_on_every_rank(trained, tmp_path):
    ranks, codes = _resume(trained, tmp_path, {"optim": {"name": "sgd"}})
    _assert_refused_everywhere(ranks, codes, "optim.name='adam', this run has 'sgd' (shapes the optimizer state")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["train.precision", "cluster.queue_size"])
def test_a_model_state_change_is_refused_on_every_rank(trained, tmp_path, case):
    sections, expected = {"train.precision": ({"train": {"precision": "bf16"}}, "train.precision='fp32', this run "
                                              "has 'bf16'"),
                          "cluster.queue_size": ({"cluster": {"queue_size": 32}}, "cluster.queue_size=64, this run "
                                                 "has 32")}[case]
    ranks, codes = _resume(trained, tmp_path, sections)
    _assert_refused_everywhere(ranks, codes, expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["optim.lr", "optim.name with checkpoint.reset_optimizer"])
def test_a_free_change_or_a_reset_optimizer_resumes(trained, tmp_path, case):
    sections, expected = {"optim.lr": ({"optim": {"lr": 0.001}}, "with changed settings: optim.lr 0.003 -> 0.001"),
                          "optim.name with checkpoint.reset_optimizer": (
                              {"optim": {"name": "sgd"}, "checkpoint": {"reset_optimizer": True}},
                              "every optimizer state started afresh (checkpoint.reset_optimizer)")}[case]
    ranks, codes = _resume(trained, tmp_path, sections)
    assert codes == [0, 0], ranks.output(0)[-3000:]
    assert expected in ranks.output(0)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 3


def _forge(step_dir, relpath: str, edit) -> None:
    """Rewrite one file of a checkpoint with `edit` applied, and its manifest entry to match (only the shape is bad)."""
    path = os.path.join(step_dir, relpath)
    state = safe_load(path, deepspeed_file=True)
    edit(state)
    torch.save(state, path)
    manifest_path = os.path.join(step_dir, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["files"][relpath] = file_digest(path)
    open(manifest_path, "w").write(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["queue", "engine"])
def test_a_forged_tensor_of_another_shape_is_named_with_file_and_key(trained, tmp_path, case):
    step_dir = tmp_path / "out" / "checkpoints" / "step_2"
    shutil.copytree(trained[0], tmp_path / "out")
    if case == "queue":
        relpath, key = "replicated.pt", "'queue.features' has shape [32, 16], this run's is [64, 16]"
        _forge(step_dir, relpath, lambda state: state["queue"].update(features=state["queue"]["features"][:32]))
    else:
        relpath = "engine/mp_rank_00_model_states.pt"
        name = next(k for k, v in safe_load(str(step_dir / relpath), deepspeed_file=True)["module"].items()
                    if v.dim() == 4)
        key = f"'module.{name}' has shape"
        _forge(step_dir, relpath, lambda state: state["module"].update({name: state["module"][name][:1]}))
    config = {**trained[1], "output": str(tmp_path / "out"), "train": {**trained[1]["train"], "max_steps": 3}}
    ranks = Ranks(tmp_path, config, args=("--resume", "auto"))
    _assert_refused_everywhere(ranks, ranks.wait(150), f"{step_dir / relpath}: key {key}")
