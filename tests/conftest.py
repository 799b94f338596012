import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# DeepSpeed JIT-builds its CPU comm op into $TORCH_EXTENSIONS_DIR, by default one folder per user
# (~/.cache/torch_extensions) whose build.ninja names this environment's torch and deepspeed paths. Two
# test sessions of two checkouts (another CI clone, a developer's run) would rebuild it over each other,
# each rebuild minutes long on a loaded machine, with the other session's ranks waiting on its lock: one
# folder per environment, inherited by every rank and launcher the tests spawn, unless the caller chose one.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# One thread per process: tests spawn several ranks on small CI machines, and oversubscribed
# OpenMP threads make small kernels ~10x slower.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> str:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def deepspeed_comm_op_built(request) -> None:
    """Build (or load) DeepSpeed's CPU shm comm op once, here, before any selected test starts DeepSpeed.

    Unbuilt, the first `deepspeed.init_distributed` of every spawned rank and launcher subprocess (trainer,
    engine, launcher and tool tests alike) would build it in $TORCH_EXTENSIONS_DIR or wait on the lock of
    the one that does: more than 5 minutes on a loaded machine, inside some test's own time limit. Built,
    this costs the deepspeed import (0.8 s measured here idle, 9 s loaded). A lock file left by a killed build (no process holds it) is removed
    here with one line (largefr.train.distributed_env.clear_stale_build_lock) instead of hanging every test.
    """
    if not request.session.items:
        return
    from deepspeed.comm.torch import build_shm_op

    from largefr.train.distributed_env import clear_stale_build_lock

    clear_stale_build_lock()
    build_shm_op()
