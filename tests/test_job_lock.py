"""One job per output folder (largefr/train/job_lock.py): a real `python launch/train.py` job holds the folder;
a second job on it is refused naming the first one's host and pid, on rank 0 and on other ranks; once the first
is killed, its lock is stale and the next job takes it over with a log line naming it."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from largefr.train.job_lock import LOCK_NAME
from largefr.train.output_folder import OutputFolderError, claim_output_folder
from tests.test_trainer import tiny_config, tiny_data  # noqa: F401  (tiny_data is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(config_path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "launch/train.py", "--config", str(config_path), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_holder(lock, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            holder = json.loads(lock.read_text() or "{}")
            if holder.get("pid") == proc.pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the first job never held {lock}:\n{proc.communicate()[0][-3000:]}")


def test_a_second_job_is_refused_while_the_first_lives_and_takes_over_once_it_died(tiny_data, tmp_path, capsys):
    output = tmp_path / "out"
    config = tmp_path / "run.json"
    endless = tiny_config(tiny_data, str(output), train={"max_steps": 100000}, schedule={"epochs": 100000},
                          logging={"every": 1000, "tensorboard": False})
    config.write_text(json.dumps(endless))
    first = _launch(config)
    try:
        holder = _wait_for_holder(output / LOCK_NAME, first)
        assert holder["host"] == socket.gethostname() and holder["started"]
        named = rf"output folder {output} is in use by another running job \(host {socket.gethostname()} " \
                rf"pid {first.pid}, started .*; nothing was changed"
        second = _launch(config, "--resume", "auto")  # --resume: the earlier-run check alone would let it in
        text = second.communicate(timeout=120)[0]
        assert second.returncode == 2, text[-3000:]
        assert re.search(rf"\[rank 0\] error: {named}", text), text[-3000:]
        with pytest.raises(OutputFolderError, match=named):  # another rank of the second job refuses alike
            claim_output_folder(str(output), str(output / "checkpoints"), resume="auto", overwrite=False, rank=1)
        assert first.poll() is None  # the first job was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (output / LOCK_NAME).exists()  # a killed job cannot delete its lock: the kernel only drops the flock
    lock = claim_output_folder(str(output), str(output / "checkpoints"), resume="auto", overwrite=False, rank=0)
    assert f"left by a job that ended without releasing it (host {socket.gethostname()} pid {first.pid}" \
        in capsys.readouterr().err
    assert json.loads((output / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (output / LOCK_NAME).exists()  # a job that ends releases and deletes it


def test_a_stale_lock_is_taken_over_with_a_line_naming_the_dead_job(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": pid, "started": "2026-12-06T10:00"}))
    claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume=None, overwrite=False, rank=1)  # no error
    lock = claim_output_folder(str(tmp_path), str(tmp_path / "checkpoints"), resume=None, overwrite=False, rank=0)
    assert f"largefr: took over {tmp_path / LOCK_NAME}, left by a job that ended without releasing it (host node7 " \
           f"pid {pid}, started 2026-12-06T10:00" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
