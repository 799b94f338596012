"""tools/gpu_acceptance.sh: what comes back from the device's $OUT, its CPU dry run, and a bare machine.

The device tool brings back at most 8 files of $OUT, each under 16 MiB, at most two folders down; the
script packs everything else into one archive (tools/gpu_acceptance_summary.py). The full dry run and
the bare-machine rerun take minutes here and are marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_acceptance.sh")
sys.path.insert(0, os.path.join(ROOT, "tools"))
from gpu_acceptance_summary import (ARCHIVE, LOG_KEEP_BYTES, OUT_MAX_DEPTH, OUT_MAX_FILE_BYTES,  # noqa: E402
                                    OUT_MAX_FILES, out_problems, write_out)

WHEELHOUSE = os.path.join(ROOT, ".wheelhouse")
BARE_HIDDEN = ("deepspeed", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "hjson")
"""What the device's image lacks of the wheelhouse (the device tool's package list): hidden from the bare venv."""


def _run(out, *args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    base.update(OUT=str(out), PYTHON=python, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=base, timeout=900, check=False)


def _steps(out) -> dict[str, dict]:
    return {step["step"]: step for step in json.loads((out / "summary.json").read_text())["steps"]}


def _assert_comes_back(out) -> list[str]:
    """OUT within the device's limits; the names of its files."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= OUT_MAX_FILES, sorted(map(str, files))
    assert all(p.stat().st_size < OUT_MAX_FILE_BYTES for p in files)
    assert all(len(p.relative_to(out).parts) - 1 <= OUT_MAX_DEPTH for p in files)
    assert out_problems(str(out)) == []
    return sorted(p.name for p in files)


def _archived(out) -> dict[str, bytes]:
    with tarfile.open(out / ARCHIVE) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


# ---------------------------------------------------------------------------------------------- fast
def test_many_and_large_step_files_come_back_as_three_files_under_the_limits(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    steps = [{"step": f"step{i}", "status": "passed", "seconds": i, "rc": 0, "reason": ""} for i in range(20)]
    (work / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    for i in range(20):
        (work / f"step{i}.log").write_text(f"log of step {i}\n")
    big = os.urandom(LOG_KEEP_BYTES // 2) * 40  # 40 MiB that gzip cannot shrink below its kept part
    (work / "gpu_tests.log").write_bytes(b"FIRST" + big + b"LAST")
    summary = write_out(str(work), str(out), dry_run=True, budget=500)
    assert _assert_comes_back(out) == [ARCHIVE, "summary.json", "summary.md"]
    archived = _archived(out)
    assert set(archived) == {p.name for p in work.iterdir()}
    kept = archived["gpu_tests.log"]
    assert kept.startswith(b"FIRST") and kept.endswith(b"LAST") and b"bytes cut by gpu_acceptance_summary.py" in kept
    assert len(kept) < LOG_KEEP_BYTES + 200 and archived["step7.log"] == b"log of step 7\n"
    assert [s["step"] for s in summary["steps"]] == [f"step{i}" for i in range(20)] and summary["out_problems"] == []


def test_out_problems_names_too_many_files_too_large_and_too_deep(tmp_path):
    for i in range(OUT_MAX_FILES):
        (tmp_path / f"file{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("x")
    with open(tmp_path / "file0.txt", "wb") as handle:
        handle.truncate(OUT_MAX_FILE_BYTES)  # sparse: 16 MiB long, nothing written
    problems = out_problems(str(tmp_path))
    assert problems[0] == f"{OUT_MAX_FILES + 1} files in {tmp_path}; at most {OUT_MAX_FILES} come back"
    assert f"file0.txt: {OUT_MAX_FILE_BYTES} bytes, not under {OUT_MAX_FILE_BYTES}" in problems
    assert os.path.join("a", "b", "c", "deep.txt") + f": more than {OUT_MAX_DEPTH} folders down" in problems


def test_a_killed_pytest_still_gives_counts_from_its_verbose_log(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "steps.jsonl").write_text(json.dumps({"step": "gpu_tests", "status": "timeout", "seconds": 240, "rc": 124,
                                                  "reason": "over its 240s limit"}) + "\n")
    (work / "gpu_tests.log").write_text("tests/gpu/test_cuda_paths.py::test_one PASSED [ 10%]\n"
                                        "tests/gpu/test_cuda_paths.py::test_two[1] FAILED [ 20%]\n"
                                        "tests/gpu/test_cuda_acceptance.py::test_three SKIPPED (needs CUDA) [ 30%]\n"
                                        "tests/gpu/test_cuda_acceptance.py::test_four ")  # killed: no outcome
    tests = write_out(str(work), str(out), dry_run=False, budget=500)["gpu_tests"]
    assert (tests["tests"], tests["passed"], tests["failed"], tests["skipped"]) == (3, 1, 1, 1)
    assert tests["failures"][0]["test"] == "tests/gpu/test_cuda_paths.py::test_two[1]"
    assert tests["source"].startswith("log")
    assert "GPU tests: 1 passed, 1 failed, 1 skipped of 3 (from the log" in (out / "summary.md").read_text()


def test_nvl_cards_get_their_own_peak_not_the_sxm_one():
    from largefr.perf.profiling import peak_tflops

    assert peak_tflops("NVIDIA H100 NVL", "bf16") == pytest.approx(835.5)
    assert peak_tflops("NVIDIA H200 NVL", "fp32") == pytest.approx(60.0)
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)


def test_a_wheelhouse_for_another_python_is_reported_and_fails_the_run(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "pydantic_core-2.50.5-cp39-cp39-manylinux2014_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    done = _run(out, "--dry-run", "--only", "install", "--wheelhouse", str(wheelhouse))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    steps = _steps(out)
    assert steps["install"]["status"] == "failed" and "gpu_tests" not in steps
    assert _assert_comes_back(out) == [ARCHIVE, "summary.json", "summary.md"]
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    log = _archived(out)["install.log"].decode()
    assert f"no pydantic-core wheel for this Python ({tag}); it has: cp39" in log
    assert f"--python {sys.version_info[0]}.{sys.version_info[1]}" in log


def _wheel(folder, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A wheel file holding only its METADATA: what the install reads to choose."""
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                       f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_install_picks_what_is_absent_or_at_a_version_another_wheel_refuses(tmp_path):
    from gpu_acceptance_install import missing_distributions, wheel_requirements, wheelhouse_distributions

    _wheel(tmp_path, "needy_tool", "1.0", ("pytest>=999", "pluggy", 'pluggy<0.1; extra == "old"'))
    _wheel(tmp_path, "pytest", "999.0")  # installed here, but older than needy-tool accepts
    _wheel(tmp_path, "pluggy", "0.0.1")  # installed here at a version needy-tool accepts: left alone
    _wheel(tmp_path, "deepspeed", "0.19.8")
    missing = missing_distributions(wheelhouse_distributions(str(tmp_path)), wheel_requirements(str(tmp_path)))
    assert missing == ["needy-tool==1.0", "pytest==999.0"]


def test_an_unknown_step_is_refused_with_the_known_ones(tmp_path):
    done = _run(tmp_path / "out", "--dry-run", "--only", "gpu_test")
    assert done.returncode == 2
    assert "--only gpu_test: no such step (install,throughput,gpu_tests,profile,bench_head,gpu_compile)" in done.stderr


def _hang_or_fail(rank: int, world: int, failing_rank: int | None) -> None:
    if rank == failing_rank:
        raise RuntimeError(f"rank {rank} fails")
    time.sleep(600)


@pytest.mark.parametrize("failing_rank,timeout_s,codes", [(1, 90, r"\[-9, 1\]"), (None, 5, r"\[-9, -9\]")],
                         ids=["a_rank_fails", "both_hang"])
def test_gpu_test_ranks_cannot_outlive_their_test(monkeypatch, failing_rank, timeout_s, codes):
    """A failed rank ends the wait at once, a hung one at SPAWN_TIMEOUT_S; either way no rank is left running."""
    import multiprocessing

    from tests.gpu import gpu_helpers

    monkeypatch.setattr(gpu_helpers, "SPAWN_TIMEOUT_S", timeout_s)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=rf"the ranks exited with {codes} \(-9: killed here after {timeout_s} s"):
        gpu_helpers.spawn_ranks(_hang_or_fail, 2, failing_rank)
    assert time.monotonic() - started < 60 and multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow  # 1.5 to 4 minutes on 2 cores: every step runs, tiny
def test_dry_run_runs_every_step_on_cpu_and_returns_at_most_8_files(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _assert_comes_back(tmp_path) == [ARCHIVE, "summary.json", "summary.md"]
    statuses = {name: step["status"] for name, step in _steps(tmp_path).items()}
    assert statuses.pop("install") in ("passed", "skipped")  # passed: a .wheelhouse/ was installed to a scratch folder
    assert statuses == {"preflight": "passed", "comm_op": "passed", "throughput": "passed", "gpu_tests": "passed",
                        "profile": "passed", "bench_head_float32": "passed", "gpu_compile": "passed",
                        "dali": "skipped"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 25 and tests["failed"] == 0 and tests["source"] == "junit"
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"] and tests["skip_reasons"] == {"needs CUDA": tests["tests"]}
    throughput = summary["throughput"]
    assert throughput["images_per_sec"] > 0 and "NOT counted" in throughput["mfu_definition"]
    assert summary["profile"]["config"]["precision"] == "bf16" and summary["bench_head"]["float32"]["step_ms"] > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "dry run" in markdown and "backbone_backward" in markdown and "| profile | passed |" in markdown
    archived = set(_archived(tmp_path))
    assert {"gpu_tests.log", "gpu_tests.xml", "throughput.json", "machine.json", "comm_op.log"} <= archived


def _bare_python(folder) -> str:
    """A venv seeing this environment's packages except BARE_HIDDEN: torch without DeepSpeed, as on the device."""
    view = folder / "view"
    view.mkdir(parents=True)
    source = sysconfig.get_paths()["purelib"]
    for entry in os.listdir(source):
        name = entry.split("-")[0].split(".")[0].lower()
        if name not in BARE_HIDDEN and not entry.endswith(".pth"):
            os.symlink(os.path.join(source, entry), view / entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    python = str(folder / "venv" / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "view.pth"), "w") as handle:
        handle.write(str(view) + "\n")
    return python


@pytest.mark.slow  # 2 to 5 minutes on 2 cores: installs DeepSpeed and builds its CPU comm op afresh
@pytest.mark.skipif(not os.path.isdir(WHEELHOUSE), reason="needs .wheelhouse/ (bash tools/build_wheelhouse.sh "
                    f"--python {sys.version_info[0]}.{sys.version_info[1]})")
def test_a_rerun_of_a_later_step_on_a_bare_machine_installs_deepspeed_first(tmp_path):
    python = _bare_python(tmp_path / "bare")
    probe = subprocess.run([python, "-c", "import torch, deepspeed"], capture_output=True, text=True)
    assert "No module named 'deepspeed'" in probe.stderr
    out, site = tmp_path / "out", tmp_path / "site"
    done = _run(out, "--dry-run", "--only", "throughput,gpu_tests", python=python, LARGEFR_SITE=str(site),
                TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), PYTHONPATH="")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {name: step["status"] for name, step in _steps(out).items()}
    assert statuses == {"preflight": "passed", "install": "passed", "comm_op": "passed", "throughput": "passed",
                        "gpu_tests": "passed", "dali": "skipped"}  # throughput: a real DeepSpeed engine trains
    assert (site / "deepspeed" / "__init__.py").exists() and not (site / "torch").exists()
    log = _archived(out)["install.log"].decode()
    missing = next(line for line in log.splitlines() if "missing here:" in line).split("missing here:")[1].split()
    names = {m.split("==")[0] for m in missing}
    assert "deepspeed==0.19.8" in missing and {"hjson", "pydantic", "pydantic-core"} <= names, missing
    assert not names & {"pytest", "pytest-timeout", "packaging"}, missing  # the machine's own stay as they are
    assert "from " + str(site) in log
    assert _assert_comes_back(out) == [ARCHIVE, "summary.json", "summary.md"]
