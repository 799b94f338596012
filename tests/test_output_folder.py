"""A run's output folder and its banner: an earlier run is refused unless the launch says --resume or
--overwrite; `--resume auto` with nothing to resume says so; a launch on another number of ranks than the
config's train.world says what changes. Real files, the real launch/train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largefr.config import load_config
from largefr.train.banner import resume_note, world_note
from largefr.train.output_folder import OutputFolderError, claim_output_folder

ROOT = Path(__file__).resolve().parents[1]


def _earlier_run(folder: Path) -> None:
    (folder / "checkpoints" / "step_3").mkdir(parents=True)
    (folder / "checkpoints" / "step_12").mkdir()
    (folder / "summary.json").write_text(json.dumps({"steps": 12}))
    (folder / "train.log").write_text("step 12/12\n")
    (folder / "notes.txt").write_text("mine")


def test_an_empty_or_new_folder_is_claimed(tmp_path):
    claim_output_folder(str(tmp_path / "new"), str(tmp_path / "new" / "checkpoints"), resume=None, overwrite=False,
                        rank=0)
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "notes.txt").write_text("not a run")
    claim_output_folder(str(tmp_path / "only_notes"), str(tmp_path / "only_notes" / "checkpoints"), resume=None,
                        overwrite=False, rank=0)


def test_an_earlier_run_is_refused_naming_it_and_the_ways_on(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(OutputFolderError, match=rf"output folder {tmp_path} holds an earlier run \(a finished run of "
                                                rf"12 steps \(summary.json\); checkpoints step_3..step_12 in "
                                                rf"{tmp_path / 'checkpoints'}; train.log\); nothing was changed. "
                                                r"Continue it with --resume auto, .* --overwrite, .* --set output=DIR"):
        claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume=None, overwrite=False, rank=1)
    assert (tmp_path / "summary.json").exists()
    claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume="auto", overwrite=False, rank=0)


def test_overwrite_deletes_the_runs_files_on_rank_0_only(tmp_path):
    _earlier_run(tmp_path)
    claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume=None, overwrite=True, rank=1)
    assert (tmp_path / "summary.json").exists()  # other ranks leave the deleting to rank 0
    claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume=None, overwrite=True, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputFolderError, match="--resume continues .* --overwrite deletes it: give one of them"):
        claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume="auto", overwrite=True, rank=0)


def test_a_quickstart_launch_on_one_rank_says_what_changes():
    config = load_config(str(ROOT / "configs" / "quickstart.json"), world_size=1)
    assert world_note(config, config.train.world) is None
    # 4800 images, 32 per rank, 4 epochs, train.max_steps 300
    assert world_note(config, 1) == (
        "this config is written for 2 ranks (train.world) and this run has 1: global batch 32, 150 steps per "
        "epoch, 300 steps, the 4-epoch schedule cut at step 300 of 600, instead of global batch 64, 75 steps per "
        "epoch, 300 steps. To run it as written: python launch/train.py --world 2 ...")
    assert "global batch 128, 37 steps per epoch, 148 steps, instead of" in world_note(config, 4)


def test_resume_note_speaks_only_when_nothing_was_found():
    assert resume_note(None, None, "runs/x/checkpoints") is None
    assert resume_note("auto", "runs/x/checkpoints/step_3", "runs/x/checkpoints") is None  # the restore says it
    assert resume_note("auto", None, "runs/x/checkpoints") == (
        "--resume auto: no complete checkpoint in runs/x/checkpoints; starting fresh at step 0")


def _launch(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_launch_says_resume_auto_found_nothing_then_refuses_to_write_over_the_run(tmp_path):
    run = tmp_path / "run"
    config = {"data": {"loader": "synthetic", "num_classes": 8, "num_images": 64, "image_size": 32},
              "model": {"network": "mbf", "embedding_size": 16}, "cluster": {"queue_size": 64},
              "train": {"batch_size": 8, "precision": "fp32", "max_steps": 1}, "output": str(run)}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    first = _launch(path, "--resume", "auto")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"largefr: --resume auto: no complete checkpoint in {run / 'checkpoints'}; starting fresh at step 0" \
        in first.stdout
    summary = (run / "summary.json").read_text()
    again = _launch(path)
    assert again.returncode == 2
    assert f"[rank 0] error: output folder {run} holds an earlier run (a finished run of 1 steps" in again.stderr
    assert (run / "summary.json").read_text() == summary and len(list((run / "tensorboard").iterdir())) == 1
