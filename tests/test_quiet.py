"""Quiet by default: DeepSpeed's no-GPU warning is filtered in every process that imports largefr first, and
LARGEFR_VERBOSE=1 (launch/train.py --verbose) shows it again. Real imports in fresh processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WARNING = "Setting accelerator to CPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed warns only where it finds no GPU")
@pytest.mark.parametrize("verbose", ["", "1"])
def test_deepspeeds_no_gpu_warning_is_filtered_unless_verbose(verbose):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LARGEFR_VERBOSE": verbose}
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run([sys.executable, "-c", "import largefr.train.distributed_env, deepspeed"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (WARNING in done.stdout + done.stderr) == bool(verbose)
