"""The training entry point turns on PyTorch's huge-page CPU allocations before torch loads (largefr.train.huge_pages)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largefr.train.huge_pages import VARIABLE

ROOT = Path(__file__).resolve().parents[1]
# run launch/train.py's main on a missing config (it stops at the config error) and record, when use_huge_pages is
# called, whether torch was loaded already; then the variable's value
PROBE = f"""
import os, runpy, sys
import largefr.train.huge_pages as huge_pages
original = huge_pages.use_huge_pages
huge_pages.use_huge_pages = lambda: print("torch loaded first:", "torch" in sys.modules) or original()
runpy.run_path("launch/train.py", run_name="probe")["main"](["--config", "missing.json"])
print("{VARIABLE}=" + str(os.environ.get("{VARIABLE}")))
"""


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0")])  # a value the user set wins
def test_launch_train_sets_huge_pages_before_torch_loads(preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, "WORLD_SIZE")}
    if preset is not None:
        env[VARIABLE] = preset
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "torch loaded first: False" in out.stdout, (out.stdout, out.stderr)
    assert f"{VARIABLE}={expected}" in out.stdout, (out.stdout, out.stderr)
