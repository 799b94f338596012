"""Storage faults on real file systems: a tmpfs too small for the next checkpoint (mounted here when the tests run
as root, skipped otherwise), a tmpfs that fills during a save, a file-size limit (RLIMIT_FSIZE: a real EFBIG,
runs anywhere), a train.log that cannot be written, and 2 real ranks stopped by a full disk or by a write that
fails inside DeepSpeed's own save. docs/RELIABILITY.md, 'Storage faults'.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import torch

from largefr.checkpoint.folders import find_latest_checkpoint
from largefr.checkpoint.save_load import CheckpointError, load_head_rows, save_checkpoint
from largefr.distributed.partition import ClassPartition
from tests.test_reliability_faults import ROOT, Ranks, fast_config
from tests.test_trainer import tiny_data  # noqa: F401  (a fixture)

NUM_CLASSES, WIDTH = 37, 4096  # ~600 KB of rows: several tmpfs pages, a few ms to write


def _args(step: int, blob: bytes = b"") -> dict:
    """One rank's save arguments; `blob` is bytes no estimate counts (only tensors are counted)."""
    rows = {"weight": torch.full((NUM_CLASSES, WIDTH), float(step))}
    return dict(engine=None, partition=ClassPartition(NUM_CLASSES, 1, 0), head_rows=rows,
                replicated={"config": {}, "blob": blob})


def _mount_tmpfs(path, size: int) -> None:
    """A tmpfs of `size` bytes on `path` (root only; skips the test otherwise)."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}; the tests need root); "
                    "test_a_file_size_limit_mid_save_is_named_and_cleaned_up covers the write failure without it")


def _resize_tmpfs(path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A mount point; the test mounts a tmpfs of the size it needs, unmounted afterwards."""
    mount = tmp_path / "disk"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _checkpoint_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(folder) for name in names)


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, small_disk):
    save_checkpoint(str(tmp_path / "measure"), 1, **_args(1))
    size = _checkpoint_bytes(tmp_path / "measure" / "step_1")
    _mount_tmpfs(small_disk, int(size * 1.6))
    root = str(small_disk)
    save_checkpoint(root, 1, **_args(1))
    with pytest.raises(CheckpointError, match=rf"checkpoint step_2 needs about .* \(the size of the last checkpoint, "
                                              rf"step_1\) but {re.escape(root)} has .* free \((\d+) of {size} bytes\): "
                                              "nothing was written.*set checkpoint.dir to a larger disk") as caught:
        save_checkpoint(root, 2, **_args(2))
    free = int(re.search(r"free \((\d+) of", str(caught.value)).group(1))
    assert 0 < free < size
    assert os.listdir(root) == ["step_1"]
    assert find_latest_checkpoint(root) == os.path.join(root, "step_1")
    assert load_head_rows(os.path.join(root, "step_1"), ClassPartition(NUM_CLASSES, 1, 0))["weight"].eq(1).all()


def test_a_first_save_is_checked_against_the_estimate_of_its_tensors(small_disk):
    _mount_tmpfs(small_disk, 256 << 10)  # the rows alone are 37 x 4096 x 4 = 592 KiB
    root = str(small_disk)
    with pytest.raises(CheckpointError, match=rf"checkpoint step_1 needs about 592.0 KiB \(estimated from the tensors "
                                              rf"to be saved\) but {re.escape(root)} has .* free \(\d+ of 606208 bytes\)"):
        save_checkpoint(root, 1, **_args(1))
    assert os.listdir(root) == []


def test_a_disk_that_fills_during_a_save_is_named_and_the_half_written_folder_removed(small_disk):
    _mount_tmpfs(small_disk, 2 << 20)
    root = str(small_disk)
    save_checkpoint(root, 1, **_args(1))
    # the last checkpoint's size fits, but this one holds 3 MiB more than any estimate counts: ENOSPC mid-write
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint step_2 in {re.escape(root)}/step_2\.tmp-"
                                              r"\S+: no space left on the device; .* free there"):
        save_checkpoint(root, 2, **_args(2, blob=b"x" * (3 << 20)))
    assert os.listdir(root) == ["step_1"]  # the .tmp- folder is gone at once: its space is free again
    assert find_latest_checkpoint(root) == os.path.join(root, "step_1")


_FSIZE_SAVE = """
import os, resource, sys
sys.path.insert(0, {root!r})
from tests.test_fault_storage import _args
from largefr.checkpoint.save_load import CheckpointError, save_checkpoint
root = {folder!r}
save_checkpoint(root, 1, **_args(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(root, 2, **_args(2, blob=b"x" * 300_000))
except CheckpointError as error:
    print("ERROR", error)
print("LEFT", sorted(os.listdir(root)))
"""


def test_a_file_size_limit_mid_save_is_named_and_cleaned_up(tmp_path):
    """RLIMIT_FSIZE gives a real EFBIG from write(2) (Python ignores SIGXFSZ): no root needed."""
    folder = str(tmp_path / "checkpoints")
    done = subprocess.run([sys.executable, "-c", _FSIZE_SAVE.format(root=ROOT, folder=folder)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"ERROR could not write checkpoint step_2 in \S+step_2\.tmp-\S+: a file reached the file-size "
                     r"limit \(ulimit -f\); .* free there \(RuntimeError: ", done.stdout), done.stdout
    assert "LEFT ['step_1']" in done.stdout


def test_a_train_log_that_cannot_be_written_is_named(small_disk):
    from largefr.checkpoint.storage import StorageError
    from largefr.train.metrics import MetricsLogger

    _mount_tmpfs(small_disk, 64 << 10)
    metrics = MetricsLogger(str(small_disk), rank=0, every=1, total_steps=1, global_batch=1, tensorboard=False)
    with pytest.raises(StorageError, match=rf"could not write train.log in {re.escape(str(small_disk))}: no space "
                                           "left on the device; 0 B \\(0 bytes\\) free there"):
        for _ in range(100):
            metrics.info("x" * 4096)
    metrics.close()


# ---------------------------------------------------------------------------- 2 real ranks


def _run_config(data: str, output, checkpoint_dir, max_steps: int) -> dict:
    return fast_config(data, str(output), train={"max_steps": max_steps, "collective_timeout_s": 30},
                       checkpoint={"every": 2, "keep_last": 1, "dir": str(checkpoint_dir)}, logging={"every": 2})


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_naming_it_and_the_last_checkpoint_resumes(tiny_data, tmp_path,  # noqa: F811
                                                                                small_disk):
    _mount_tmpfs(small_disk, 256 << 20)
    output = tmp_path / "out"
    assert Ranks(tmp_path, _run_config(tiny_data, output, small_disk, 2), tag="first").wait(120) == [0, 0]
    size = _checkpoint_bytes(small_disk / "step_2")
    _resize_tmpfs(small_disk, int(size * 1.5))  # room for half of the next checkpoint
    config = _run_config(tiny_data, output, small_disk, 4)
    full = Ranks(tmp_path, config, args=("--resume", "auto"), tag="full")
    codes = full.wait(120)
    for rank in range(2):
        assert codes[rank] == 1 and re.search(rf"\[rank {rank}\] error: cannot write a checkpoint under {small_disk}: "
                                              rf"checkpoint step_4 needs about .* \(the size of the last checkpoint, "
                                              rf"step_2\) but {small_disk} has", full.output(rank)), full.output(rank)
        assert "Traceback" not in full.output(rank)
    assert sorted(os.listdir(small_disk)) == ["step_2"]
    _resize_tmpfs(small_disk, 256 << 20)  # space freed: the same command resumes and ends
    rerun = Ranks(tmp_path, config, args=("--resume", "auto"), tag="rerun")
    assert rerun.wait(120) == [0, 0], rerun.output(0)[-3000:]
    assert json.loads((output / "summary.json").read_text())["steps"] == 4
    assert sorted(os.listdir(small_disk)) == ["step_4"]


@pytest.mark.slow
def test_a_write_that_fails_inside_deepspeeds_save_ends_every_rank_naming_it(tiny_data, tmp_path):  # noqa: F811
    """Rank 0 alone may not write files over 1 MB (prlimit, a real EFBIG): DeepSpeed's torch.save of the module
    fails on rank 0 while rank 1 waits in DeepSpeed's closing barrier; both must end naming the folder."""
    output = tmp_path / "out"
    config = _run_config(tiny_data, output, output / "checkpoints", 4)
    ranks = Ranks(tmp_path, config)
    resource.prlimit(ranks.procs[0].pid, resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # nothing else
    # rank 0 writes is that large
    codes = ranks.wait(90)
    for rank in range(2):
        assert codes[rank] == 1 and re.search(rf"\[rank {rank}\] error: rank 0: could not write checkpoint step_2 "
                                              r"\(DeepSpeed's engine files\) in \S+step_2\.tmp-\S+/engine: a file "
                                              r"probably reached the file-size limit of this process \(ulimit -f: "
                                              r"1048576 bytes\)", ranks.output(rank)), ranks.output(rank)
        assert "Traceback" not in ranks.output(rank)
    assert not os.path.exists(output / "checkpoints") or os.listdir(output / "checkpoints") == []
