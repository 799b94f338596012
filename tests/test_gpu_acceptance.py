"""tools/gpu_acceptance.sh in its CPU dry mode (so the GPU acceptance wiring cannot rot without a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_acceptance.sh")


def _run(out, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600, check=False)


def _steps(out) -> dict[str, dict]:
    return {step["step"]: step for step in json.loads((out / "summary.json").read_text())["steps"]}


def test_dry_run_runs_every_step_on_cpu_and_writes_the_summary(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = _steps(tmp_path)
    assert {name: step["status"] for name, step in steps.items()} == {
        "preflight": "passed", "install": "skipped", "gpu_tests": "passed", "profile": "passed",
        "bench_head_float32": "passed", "dali": "skipped"}
    assert "skipped dali:" in done.stdout and "skipped install: no --wheelhouse given" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 20 and tests["failed"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"] and tests["skip_reasons"] == {"needs CUDA": tests["tests"]}
    profile = summary["profile"]
    assert profile["config"]["precision"] == "bf16" and profile["images_per_sec"] > 0
    assert summary["bench_head"]["float32"]["step_ms"] > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "dry run" in markdown and "backbone_backward" in markdown and "| profile | passed |" in markdown
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 2**20  # a few small files


def test_a_wheelhouse_for_another_python_is_reported_and_fails_the_run(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "pydantic_core-2.50.5-cp39-cp39-manylinux2014_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    done = _run(out, "--dry-run", "--only", "install", "--wheelhouse", str(wheelhouse))
    assert done.returncode == 1
    steps = _steps(out)
    assert steps["install"]["status"] == "failed" and "gpu_tests" not in steps
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    log = (out / "install.log").read_text()
    assert f"no pydantic-core wheel for this Python ({tag}); it has: cp39" in log
    assert f"--python {sys.version_info[0]}.{sys.version_info[1]}" in log
