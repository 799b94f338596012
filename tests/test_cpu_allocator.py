"""A training process allocates large CPU tensors on huge pages and from memory it already holds
(largefr.train.cpu_allocator), set before torch loads; a value the user set wins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largefr.train.cpu_allocator import GLIBC_VARIABLES, VARIABLE

ROOT = Path(__file__).resolve().parents[1]
# run launch/train.py's main on a missing config (it stops at the config error) and record, when the allocator is
# configured, whether torch was loaded already; then the variable's value
PROBE = f"""
import os, runpy, sys
import largefr.train.cpu_allocator as cpu_allocator
original = cpu_allocator.configure_cpu_allocator
cpu_allocator.configure_cpu_allocator = lambda: print("torch loaded first:", "torch" in sys.modules) or original()
runpy.run_path("launch/train.py", run_name="probe")["main"](["--config", "missing.json"])
print("{VARIABLE}=" + str(os.environ.get("{VARIABLE}")))
"""


def _clean_env(**preset: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, "WORLD_SIZE", *GLIBC_VARIABLES)}
    env.update(preset)
    return env


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0")])  # a value the user set wins
def test_launch_train_configures_the_allocator_before_torch_loads(preset, expected):
    env = _clean_env(**({} if preset is None else {VARIABLE: preset}))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "torch loaded first: False" in out.stdout, (out.stdout, out.stderr)
    assert f"{VARIABLE}={expected}" in out.stdout, (out.stdout, out.stderr)


# Resident memory after freeing a 256 MiB tensor, with or without keep_freed_memory (which runs first, as in the
# entry points). Kept: the pages stay with the process for the next tensor; not kept: glibc unmaps them.
RESIDENT_PROBE = """
import sys
from largefr.train.cpu_allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

before = resident_mib()
tensor = torch.ones(64 * 2**20)  # 256 MiB, touched
del tensor
print(kept, round(resident_mib() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc on Linux only")
@pytest.mark.parametrize("mode", ["keep", "default", "user-set"])
def test_freed_memory_is_kept_unless_the_user_set_glibc(mode):
    env = _clean_env(**({"MALLOC_TRIM_THRESHOLD_": "131072"} if mode == "user-set" else {}))
    out = subprocess.run([sys.executable, "-c", RESIDENT_PROBE, "default" if mode == "default" else "keep"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    kept, grown_mib = out.stdout.split()
    assert kept == str(mode == "keep"), out.stdout
    if mode == "keep":
        assert int(grown_mib) >= 200, f"the freed 256 MiB should stay resident, grew {grown_mib} MiB"
    else:
        assert int(grown_mib) < 64, f"the freed 256 MiB should be returned, still {grown_mib} MiB more"
