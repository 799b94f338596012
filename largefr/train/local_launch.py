"""Ranks on this machine started by largefr itself: DeepSpeed's launcher on a rendezvous port that is free.

`python launch/train.py --world N` and tools/ablate.py use it. The port is chosen before any rank starts,
so another job on the default port (29500: DeepSpeed's and torch's) does not stop the run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from largefr.distributed.spawn import free_port
from largefr.quiet import verbose
from largefr.train.launcher_watch import SignalForwarder

LAUNCH_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"
FORWARD_POLL_S = 0.5


def deepspeed_local_prefix(world: int, port: int | None = None) -> list[str]:
    """DeepSpeed's launcher for `world` ranks on this machine, on `port` (a free one when None)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
            "--master_port", str(free_port() if port is None else port)]


def launch_local_ranks(world: int, train_args: Sequence[str]) -> int:
    """Run launch/train.py with `train_args` on `world` local ranks; the launcher's exit code."""
    port = free_port()
    print(f"largefr: starting {world} ranks on this machine with DeepSpeed's launcher, rendezvous on free port "
          f"127.0.0.1:{port}", file=sys.stderr, flush=True)
    # A session of its own: a terminal's Ctrl-C reaches this process only, which forwards it to the ranks
    # themselves (DeepSpeed's launch.py would SIGKILL those still running 30 s later and exit 1; see
    # largefr/train/launcher_watch.py).
    launcher = subprocess.Popen([*deepspeed_local_prefix(world, port), *launcher_quiet_options(),
                                 str(LAUNCH_SCRIPT), *train_args], env=launcher_environment(), start_new_session=True)
    forwarder = SignalForwarder(launcher.pid, str(LAUNCH_SCRIPT))
    forwarder.install()
    while launcher.poll() is None:
        forwarder.forward()  # ranks that started after the signal get it too
        time.sleep(FORWARD_POLL_S)
    return launcher.returncode


def launcher_quiet_options() -> list[str]:
    """The launcher's own INFO lines (its command, world info, each spawn) unless LARGEFR_VERBOSE=1;
    its errors (a rank that failed, and which) still show."""
    return [] if verbose() else ["--log_level", "error"]


def launcher_environment() -> dict[str, str]:
    """The launcher's and ranks' environment: on a machine without a GPU, DeepSpeed's CPU accelerator named
    (DS_ACCELERATOR=cpu), so none of the processes warns that it found no GPU."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available() and not verbose():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env
