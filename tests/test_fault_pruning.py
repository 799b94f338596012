"""Pruning touches only what the saving job owns, says what it does to folders it could not read, and
`--resume auto` never restarts silently over checkpoints it cannot use (docs/RELIABILITY.md, 'Pruning and
--resume auto'). Real processes stand for the other writers: a live one and one that has exited."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from largefr.checkpoint.folders import (START_OVER, find_latest_checkpoint, leftover_owner, resolve_checkpoint,
                                        temporary_name)
from largefr.checkpoint.save_load import CheckpointError, save_checkpoint
from tests.test_checkpoint import _one_rank


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _host() -> str:
    return leftover_owner(temporary_name(0))[0]


def test_a_save_removes_only_its_own_and_dead_writers_leftovers(tmp_path):
    root = str(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        others = {"live": f"step_3.tmp-{_host()}-{live.pid}", "other host": "step_3.tmp-node-b.cluster-4242",
                  "dead": f"step_2.tmp-{_host()}-{_exited_pid()}", "own": temporary_name(1)}
        for name in others.values():  # half-written: a head file, no manifest
            (tmp_path / name).mkdir()
            (tmp_path / name / "head_rank00000_of00001.pt").write_bytes(b"\0" * 1000)
        notes: list[str] = []
        save_checkpoint(root, 5, **_one_rank(step=5), notify=notes.append)
    finally:
        live.kill()
        live.wait()
    assert sorted(os.listdir(root)) == sorted(["step_5", others["live"], others["other host"]])
    assert any(f"removed {root}/{others['dead']}: a half-written checkpoint left by process" in n for n in notes), notes
    for kept in ("live", "other host"):
        assert any(f"left {root}/{others[kept]} alone" in note and "two jobs write" in note for note in notes), notes
    assert not any(others["own"] in note for note in notes)  # its own leftovers go without a word


def test_a_later_checkpoint_it_could_not_read_is_set_aside_with_the_reason(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 10, **_one_rank(step=10))
    os.remove(os.path.join(root, "step_10", "manifest.json"))
    notes: list[str] = []
    save_checkpoint(root, 7, **_one_rank(step=7), notify=notes.append)
    assert sorted(os.listdir(root)) == ["step_10.superseded", "step_7"]
    assert any(f"{root}/step_10 is a checkpoint that cannot be resumed (has no manifest.json" in note
               and "renamed to" in note for note in notes), notes


def test_resume_auto_with_every_checkpoint_unusable_refuses_naming_them(tmp_path):
    root = str(tmp_path)
    for step in (4, 8):
        save_checkpoint(root, step, **_one_rank(step=step))
    os.remove(os.path.join(root, "step_8", "manifest.json"))
    assert resolve_checkpoint("auto", root) == os.path.join(root, "step_4")  # one usable: taken, the other named
    os.remove(os.path.join(root, "step_4", "manifest.json"))
    with pytest.raises(CheckpointError, match=rf"--resume auto: {root} holds 2 checkpoint\(s\) and none can be "
                                              r"resumed \(step_4: has no manifest.json.*; step_8: has no manifest.json"
                                              r".*\). Nothing was changed; start over with --overwrite"):
        resolve_checkpoint("auto", root)
    assert "--overwrite" in START_OVER and sorted(os.listdir(root)) == ["step_4", "step_8"]
    assert find_latest_checkpoint(root) is None
    assert resolve_checkpoint("auto", str(tmp_path / "empty")) is None  # nothing there at all: a fresh start
