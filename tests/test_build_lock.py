"""A JIT build lock left by a killed build of DeepSpeed's CPU comm op: removed with one line, not a silent hang.

Real files in a private $TORCH_EXTENSIONS_DIR; a real process holding the lock open stands for a build in
progress (torch's FileBaton keeps the file open while it builds, and that lock is left alone), and the real
launch/train.py meets the stale one and trains.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from largefr.train.distributed_env import SHM_COMM_OP, StaleBuildLockError, clear_stale_build_lock, stale_build_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_OP = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], SHM_COMM_OP)  # the session's, built by tests/conftest.py


@pytest.fixture
def lock_path(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return str(tmp_path / "extensions" / SHM_COMM_OP / "lock")


def _leave_lock(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_EXCL))  # as FileBaton.try_acquire, then the build "dies"


def test_no_lock_file_is_not_stale(lock_path):
    assert stale_build_lock() is None
    assert clear_stale_build_lock() is None


def test_lock_held_by_a_live_build_is_waited_for_and_stale_once_it_dies(lock_path):
    _leave_lock(lock_path)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "print('open', flush=True); time.sleep(120)", lock_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert stale_build_lock() is None  # a build in progress: waiting on it is right
    finally:
        holder.kill()
        holder.wait()
    assert stale_build_lock() == lock_path


def test_stale_lock_is_removed_with_one_line(lock_path, capsys):
    _leave_lock(lock_path)
    assert clear_stale_build_lock() == lock_path
    assert not os.path.exists(lock_path)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"largefr: removed {lock_path}, left by a killed build of DeepSpeed's {SHM_COMM_OP} op "
                     "(no process held it); the op is built again"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root removes files from a read-only folder")
def test_a_stale_lock_that_cannot_be_removed_raises_naming_the_file(lock_path):
    _leave_lock(lock_path)
    os.chmod(os.path.dirname(lock_path), 0o500)
    try:
        with pytest.raises(StaleBuildLockError, match=rf"{lock_path}: a lock file left by a killed build.*"
                                                      "could not be removed"):
            clear_stale_build_lock()
    finally:
        os.chmod(os.path.dirname(lock_path), 0o700)


def test_launch_train_py_with_a_stale_lock_removes_it_and_trains(lock_path, tmp_path):
    shutil.copytree(BUILT_OP, os.path.dirname(lock_path))  # mtimes kept: ninja finds nothing to rebuild
    _leave_lock(lock_path)
    config = {"data": {"loader": "synthetic", "num_classes": 8, "num_images": 64, "image_size": 32},
              "model": {"network": "mbf", "embedding_size": 16}, "cluster": {"queue_size": 64},
              "train": {"batch_size": 8, "precision": "fp32", "max_steps": 1}, "output": str(tmp_path / "run")}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCH_EXTENSIONS_DIR": os.path.dirname(os.path.dirname(lock_path))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=300, env=env)  # a hang fails here
    assert done.returncode == 0, done.stderr
    assert f"largefr: removed {lock_path}, left by a killed build" in done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
