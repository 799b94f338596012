"""A scheduler's SIGTERM to the launcher's pid stops every rank at a checkpoint that resumes
(largefr/train/launcher_watch.py), under `deepspeed launch/train.py` and `python launch/train.py --world 2`.

DeepSpeed's runner dies of the signal at once (it forwards nothing on one machine); the ranks see their
launcher end and stop as on SIGTERM. `python launch/train.py --world 2` forwards the signal to the ranks
and exits 0 once they stopped cleanly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from largefr.checkpoint.save_load import find_latest_checkpoint
from largefr.distributed.spawn import free_port
from largefr.train.launcher_watch import descendants, rank_processes
from largefr.train.local_launch import LAUNCH_SCRIPT
from tests.test_reliability_faults import fast_config
from tests.test_trainer import tiny_data  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_BOUND_S = 90.0
"""From the signal to the last process of the job gone: a step, the checkpoint, the ranks' exit (loaded machine)."""


def _command(launcher: str, config: str, *args: str) -> tuple[list[str], str]:
    """The launch command and the script path its ranks run (as they see it)."""
    if launcher == "deepspeed":
        runner = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        return ([sys.executable, runner, "--num_gpus", "2", "--master_port", str(free_port()), "--log_level", "error",
                 "launch/train.py", "--config", config, *args], "launch/train.py")
    return [sys.executable, "launch/train.py", "--config", config, "--world", "2", *args], str(LAUNCH_SCRIPT)


def _start(launcher: str, config: str, log, *args: str) -> tuple[subprocess.Popen, str]:
    command, script = _command(launcher, config, *args)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), script


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_steps(train_log, launcher: subprocess.Popen, console, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        if train_log.is_file() and f"step {steps}/" in train_log.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"no step {steps} in {train_log}:\n{console.read_text()[-3000:]}")


@pytest.mark.slow  # about 75 s each on the 2-core dev machine: two launches of 2 ranks
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("launcher", ["deepspeed", "world"])
def test_a_signal_to_the_launcher_leaves_no_rank_and_a_checkpoint_that_resumes(tiny_data, tmp_path, launcher, sent):
    output = tmp_path / "out"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(fast_config(tiny_data, str(output), schedule={"epochs": 1000}, logging={"every": 1},
                                             train={"max_steps": 1000, "collective_timeout_s": 120})))
    console = tmp_path / "console.log"
    with open(console, "w") as log:
        job, script = _start(launcher, str(config), log)
        try:
            _wait_for_steps(output / "train.log", job, console, steps=3)
            ranks = rank_processes(job.pid, script)
            everything = list(descendants(job.pid))
            assert len(ranks) == 2, (ranks, everything)
            os.kill(job.pid, sent)  # the launcher's pid alone, as a scheduler does
            deadline = time.monotonic() + STOP_BOUND_S
            while any(map(_alive, everything)) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [pid for pid in everything if _alive(pid)]
            assert not left, f"still running {STOP_BOUND_S} s after the SIGTERM: {left}\n{console.read_text()[-3000:]}"
            code = job.wait(timeout=30)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = console.read_text()
    if launcher == "world":
        assert code == 0, text[-3000:]  # every rank stopped cleanly
        received = sent.name  # forwarded to the ranks as it came
    else:
        assert code != 0  # DeepSpeed's runner dies of SIGTERM (-15), or of SIGINT's KeyboardInterrupt (1)
        assert re.search(r"\[rank [01]\] largefr: the launcher process \d+ \(.*deepspeed.*\) ended: stopping", text)
        received = "SIGTERM"  # the ranks signal themselves
    stopped = re.search(rf"stop requested \({received}\): checkpointing at step (\d+) and exiting",
                        (output / "train.log").read_text())
    assert stopped, text[-3000:]
    stop_step = int(stopped.group(1))
    assert find_latest_checkpoint(str(output / "checkpoints")) == str(output / "checkpoints" / f"step_{stop_step}")

    with open(tmp_path / "resume.log", "w") as log:
        resumed, _ = _start("world", str(config), log, "--resume", "auto", "--set", f"train.max_steps={stop_step + 1}")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert json.loads((output / "summary.json").read_text())["steps"] == stop_step + 1


# ---------------------------------------------------------------------------- the parts, fast


@pytest.mark.parametrize("words, launcher", [
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "launch/train.py"], True),
    (["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "launch/train.py"], True),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "launch/train.py"], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "launch/train.py"], True),
    (["python", "launch/train.py", "--config", "c.json", "--world", "2"], True),  # our --world launcher
    (["python", "-u", "/src/launch/train.py", "--local_rank=0", "--config", "c.json", "--world", "2"], False),  # a rank
    (["bash", "/home/me/deepspeed_jobs/run.sh"], False),  # a word deep in a path is not a launcher
    (["python", "-m", "pytest", "tests", "--config", "deepspeed.json"], False),
])
def test_launchers_are_known_by_their_program(words, launcher):
    from largefr.train.launcher_watch import is_launcher

    assert is_launcher(words) is launcher


def test_a_launcher_that_ended_is_seen_even_before_it_is_reaped():
    from largefr.train.launcher_watch import first_ended, process_stat

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watched = [(child.pid, process_stat(child.pid), "python -c sleep")]
    assert first_ended(watched) is None
    child.kill()
    deadline = time.monotonic() + 10
    while first_ended(watched) is None and time.monotonic() < deadline:  # a zombie until wait() below
        time.sleep(0.05)
    assert first_ended(watched) == (child.pid, "python -c sleep")
    child.wait()
    assert first_ended(watched) == (child.pid, "python -c sleep")
