"""Ranks on this machine started by largefr itself: DeepSpeed's launcher on a rendezvous port that is free.

`python launch/train.py --world N` and tools/ablate.py use it. The port is chosen before any rank starts,
so another job on the default port (29500: DeepSpeed's and torch's) does not stop the run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Sequence

from largefr.distributed.spawn import free_port

LAUNCH_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def deepspeed_local_prefix(world: int, port: int | None = None) -> list[str]:
    """DeepSpeed's launcher for `world` ranks on this machine, on `port` (a free one when None)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
            "--master_port", str(free_port() if port is None else port)]


def launch_local_ranks(world: int, train_args: Sequence[str]) -> int:
    """Run launch/train.py with `train_args` on `world` local ranks; the launcher's exit code."""
    port = free_port()
    print(f"largefr: starting {world} ranks on this machine with DeepSpeed's launcher, rendezvous on free port "
          f"127.0.0.1:{port}", file=sys.stderr, flush=True)
    return subprocess.call([*deepspeed_local_prefix(world, port), str(LAUNCH_SCRIPT), *train_args])
