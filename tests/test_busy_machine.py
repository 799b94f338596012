"""Start-up on a busy machine: the README's quickstart command trains while another process holds port 29500;
a launcher's busy port and a rendezvous that fails are reported as what they are (real sockets, real launcher)."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from largefr.distributed.spawn import free_port
from largefr.train.distributed_env import RendezvousError, check_rendezvous_port, init_distributed

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 29500  # DeepSpeed's and torch's default rendezvous port


def readme_quickstart_command() -> list[str]:
    """The training command of the README's first code block, after its install steps, as the README gives it."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if "launch/train.py --config configs/quickstart.json" in line and "pip install" in line]
    assert len(lines) == 1, "README.md: expected one install-and-train quickstart line"
    command = shlex.split(lines[0].split(" && ")[-1])
    return [sys.executable if command[0] in ("python", "python3") else command[0], *command[1:]]


@contextmanager
def port_held(port: int):
    """A listening socket on `port` (or the process that already holds it) for the duration."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:  # someone else holds it already: busy either way
            pass
        yield


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_readme_quickstart_command_trains_while_port_29500_is_held(tmp_path):
    small = [f"data.synthetic.cache_dir={tmp_path / 'data'}", "data.synthetic.identities=16",
             "data.synthetic.images_per_identity=8", "data.synthetic.val_pairs=40",
             "data.synthetic.heldout_identities=0", "data.num_classes=16", "data.num_images=128",
             "train.max_steps=3", "eval.every=0", "checkpoint.every=0", f"output={tmp_path / 'run'}"]
    with port_held(DEFAULT_PORT):
        done = subprocess.run([*readme_quickstart_command(), "--set", *small], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["launcher"]) == (3, 2, "deepspeed")
    assert "rendezvous on free port 127.0.0.1:" in done.stderr
    output = done.stdout + done.stderr  # quiet by default: no third-party line that says nothing (largefr/quiet.py)
    assert "Setting accelerator to CPU" not in output and "built successfully" not in output
    assert "[INFO] [launch.py" not in output and "Unable to find hostfile" not in output
    assert "] largefr: generating the synthetic data set into" in done.stdout  # timestamped, as the log lines
    assert "] largefr: synthetic data set ready in" in done.stdout


def test_a_launchers_busy_port_is_named_with_the_flag_to_change(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        environ = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with pytest.raises(RendezvousError, match=rf"rendezvous port 127.0.0.1:{port} \(MASTER_PORT, set by "
                                                  r"deepspeed\) is held by another process.*--master_port \d+"):
            check_rendezvous_port("deepspeed", environ)
        check_rendezvous_port("deepspeed", {**environ, "RANK": "1"})  # only rank 0 binds it
        check_rendezvous_port("torchrun", {**environ, "TORCHELASTIC_USE_AGENT_STORE": "True"})  # the agent's own


def test_a_rank_that_meets_no_one_says_the_rendezvous_failed(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RendezvousError, match=r"rank 1 of 2 could not meet the others at 127.0.0.1:\d+ "
                                              r"\(MASTER_ADDR:MASTER_PORT, set by env\) within 2 s: .*nothing "
                                              "was trained yet"):
        init_distributed(timeout_s=2)
