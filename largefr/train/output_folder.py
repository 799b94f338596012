"""The run's output folder: a folder holding an earlier run is refused unless the launch says what to do with it.

One place decides whether a run may write into `output`:

* a folder another running job holds (its `job.lock`, largefr/train/job_lock.py) is refused first, naming
  that job's host and pid, whatever the launch says; a lock left by a job that died is taken over;
* an empty or new folder: the run starts;
* `--resume auto|PATH`: the run continues the one there (it appends to train.log and TensorBoard);
* `--overwrite`: the earlier run's files (RUN_FILES and the checkpoint folder) are deleted first, by rank 0;
* otherwise a folder with any of RUN_FILES is refused with a message naming what is there and the three
  ways on: `--resume auto`, `--overwrite`, `--set output=DIR`. Other files there (notes, a tool's logs) are
  neither a reason to refuse nor deleted.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from largefr.errors import UserError
from largefr.train.job_lock import JobLock, JobLockError, check_job_lock, take_job_lock

RUN_FILES = ("config.json", "summary.json", "train.log", "tensorboard")
"""What a run writes into its output folder besides checkpoints (which may live elsewhere: checkpoint.dir)."""


class OutputFolderError(UserError, FileExistsError):
    """The output folder holds an earlier run and the launch said neither --resume nor --overwrite."""


def _step_names(checkpoint_dir: Path) -> list[str]:
    if not checkpoint_dir.is_dir():
        return []
    steps = [p.name for p in checkpoint_dir.iterdir() if p.name.startswith("step_")]
    return sorted(steps, key=lambda name: (len(name), name))


def describe_earlier_run(output: Path, checkpoint_dir: Path) -> str | None:
    """What an earlier run left in `output` (and `checkpoint_dir`), in a few words; None when nothing."""
    present = [name for name in RUN_FILES if (output / name).exists()]
    steps = _step_names(checkpoint_dir)
    if not present and not steps:
        return None
    parts = []
    summary = output / "summary.json"
    if summary.is_file():
        try:
            finished = json.loads(summary.read_text())
            parts.append(f"a finished run of {finished.get('steps', '?')} steps (summary.json)")
        except (OSError, ValueError):
            parts.append("summary.json")
    if steps:
        parts.append(f"checkpoints {steps[0]}..{steps[-1]} in {checkpoint_dir}" if len(steps) > 1
                     else f"checkpoint {steps[0]} in {checkpoint_dir}")
    others = [name for name in present if name != "summary.json"]
    if others:
        parts.append(", ".join(others))
    return "; ".join(parts)


def remove_earlier_run(output: Path, checkpoint_dir: Path) -> None:
    """Delete what a run writes (RUN_FILES, the checkpoint folder); anything else in `output` stays."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)


def claim_output_folder(output: str, checkpoint_dir: str, *, resume: str | None, overwrite: bool,
                        rank: int) -> JobLock | None:
    """Decide whether this run may write into `output` (see the module docstring); every rank calls it.

    Called before the ranks meet and before any rank writes, so every rank sees the same folder. Rank 0
    returns the job lock it now holds: release it when the run ends (a refusal here releases it).
    """
    try:
        lock = take_job_lock(output) if rank == 0 else check_job_lock(output)
    except JobLockError as error:
        raise OutputFolderError(str(error)) from None
    try:
        _check_earlier_run(Path(output), Path(checkpoint_dir), resume=resume, overwrite=overwrite, rank=rank)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _check_earlier_run(out: Path, ckpt: Path, *, resume: str | None, overwrite: bool, rank: int) -> None:
    output = str(out)
    if resume is not None:
        if overwrite:
            raise OutputFolderError("--resume continues the run in the output folder and --overwrite deletes it: "
                                    "give one of them")
        return
    earlier = describe_earlier_run(out, ckpt)
    if earlier is None:
        return
    if overwrite:
        if rank == 0:
            remove_earlier_run(out, ckpt)
            print(f"largefr: --overwrite: deleted the earlier run in {output} ({earlier})", flush=True)
        return
    raise OutputFolderError(
        f"output folder {output} holds an earlier run ({earlier}); nothing was changed. Continue it with "
        f"--resume auto, delete it and start over with --overwrite, or write elsewhere with --set output=DIR")
