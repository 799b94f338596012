"""The checkpoint folder: temporary names and who owns them, promotion, pruning, finding what to resume.

A checkpoint is written as ``step_<N>.tmp-<host>-<pid>/`` (the host and pid of rank 0's process) and
renamed to ``step_<N>/`` once its manifest is written. A save touches only what it owns: its own
temporary folders, and those a process of this host left that is no longer running (a crashed run
of this job); a temporary folder of a live process, or of another host, is another job's
half-written checkpoint and is left alone, with a line saying so. Every checkpoint it renames or
deletes that it could not read is named, with the reason, through `notify`.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from typing import Callable

from largefr.checkpoint.files import (MANIFEST_NAME, STEP_DIR_PATTERN, CheckpointError, fsync_dir, list_step_dirs,
                                      step_dir_name, validate_checkpoint)

log = logging.getLogger(__name__)
Notify = Callable[[str], None]

LEFTOVER_PATTERN = re.compile(r"^step_\d+\.(tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
"""Temporary folders of a save: `.tmp-` while written, `.old-` for a replaced checkpoint of the same step.
Names without a host were written by largefr versions before the host was recorded (taken as this host)."""
CHECKPOINT_NAMING = "a run folder, its checkpoints/ folder or one step_<N> folder"
"""What every tool's --checkpoint (and checkpoint.resume, model.init_from) accepts."""
START_OVER = ("start over with --overwrite in place of --resume auto (it deletes them; or move them away), or "
              "resume one by hand with --resume PATH once repaired")
"""What to do when `--resume auto` finds checkpoints and none can be resumed."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temporary_name(step: int, kind: str = "tmp") -> str:
    """`step_<N>.<kind>-<host>-<pid>`: owned by this process."""
    return f"{step_dir_name(step)}.{kind}-{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) that wrote temporary folder `name`; None when `name` is not one."""
    match = LEFTOVER_PATTERN.match(name)
    if match is None:
        return None
    return match.group("host") or _host(), int(match.group("pid"))


def clear_leftovers(root: str, notify: Notify) -> None:
    """Delete this process's temporary folders and those of dead processes of this host; name the rest."""
    for name in sorted(os.listdir(root)):
        owner = leftover_owner(name)
        if owner is None:
            continue
        host, pid = owner
        path = os.path.join(root, name)
        if host == _host() and pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)
        elif host == _host() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            notify(f"removed {path}: a half-written checkpoint left by process {pid} of this host, which is no "
                   "longer running")
        else:
            notify(f"left {path} alone: a checkpoint being written by process {pid} on host {host}, which may still "
                   "run; two jobs write to this checkpoint folder? (give each run its own output folder)")


def rename_into_place(tmp: str, final: str, step: int) -> None:
    """A checkpoint of the same step (saved again after a resume) is replaced, never merged."""
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(final), temporary_name(step, "old"))
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def why_incomplete(path: str) -> str | None:
    """Why checkpoint `path` cannot be resumed (without the path), or None when it is complete."""
    try:
        validate_checkpoint(path)
    except CheckpointError as error:
        return str(error).replace(f"checkpoint {path}: ", "").replace(f"checkpoint {path} ", "")
    return None


def prune(root: str, step: int, final: str, keep_last: int, notify: Notify) -> None:
    """After `final` (step `step`) was written: set aside checkpoints of later steps (an abandoned timeline)
    so that 'auto' resumes this one, clear temporary folders this job owns, keep the newest `keep_last`
    complete checkpoints (0 = all). Incomplete checkpoints are never deleted here."""
    for other_step, path in list_step_dirs(root):
        if other_step > step:
            problem = why_incomplete(path)
            state = "a complete checkpoint" if problem is None else f"a checkpoint that cannot be resumed ({problem})"
            notify(f"{path} is {state} of a later step than the one just written ({final}); renamed to "
                   f"{path}.superseded so that --resume auto picks the new one")
            os.rename(path, f"{path}.superseded")
    clear_leftovers(root, notify)
    if keep_last <= 0:
        return
    complete = [path for _, path in list_step_dirs(root) if why_incomplete(path) is None]
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def last_checkpoint_bytes(root: str) -> tuple[int, str] | None:
    """(bytes, name) of the newest complete checkpoint under `root`: what the next save will need."""
    latest = find_latest_checkpoint(root, quiet=True)
    if latest is None:
        return None
    files = validate_checkpoint(latest)["files"]
    size = sum(entry["size"] for entry in files.values()) + os.path.getsize(os.path.join(latest, MANIFEST_NAME))
    return size, os.path.basename(latest)


# ---------------------------------------------------------------------------------------------
# What to resume

def find_latest_checkpoint(ckpt_root: str, *, quiet: bool = False) -> str | None:
    """The complete checkpoint of the highest step under `ckpt_root` (None if there is none).

    Half-written ones (no manifest, `.tmp-` names, missing or truncated files) are skipped, each
    with a warning naming it and why (unless `quiet`).
    """
    for _, path in reversed(list_step_dirs(ckpt_root)):
        problem = why_incomplete(path)
        if problem is None:
            return path
        if not quiet:
            log.warning("skipping checkpoint %s, which cannot be resumed: %s", path, problem)
    return None


def resolve_checkpoint(resume: str | None, ckpt_root: str) -> str | None:
    """`checkpoint.resume` to a directory: None -> None; 'auto' -> the latest complete checkpoint under
    `ckpt_root`, None when there is no checkpoint at all, an error when there are some and none is
    complete (a silent restart at step 0 would later set them aside); a path -> as `locate_checkpoint`."""
    if resume is None:
        return None
    if resume != "auto":
        return locate_checkpoint(resume)
    latest = find_latest_checkpoint(ckpt_root)
    steps = list_step_dirs(ckpt_root)
    if latest is None and steps:
        reasons = "; ".join(f"{os.path.basename(path)}: {why_incomplete(path)}" for _, path in steps)
        raise CheckpointError(f"--resume auto: {ckpt_root} holds {len(steps)} checkpoint(s) and none can be resumed "
                              f"({reasons}). Nothing was changed; {START_OVER}")
    return latest


def locate_checkpoint(path: str) -> str:
    """The checkpoint `path` names: a step_<N> folder (must be complete), or the latest complete one of a
    checkpoints/ folder or of a run folder; the error says what was found there."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder; name {CHECKPOINT_NAMING}")
    named_step = STEP_DIR_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)) or named_step:
        validate_checkpoint(path)  # one named checkpoint: say exactly what is wrong with it
        return path
    root = path
    if not list_step_dirs(root) and os.path.isdir(os.path.join(path, "checkpoints")):
        root = os.path.join(path, "checkpoints")  # a run folder
    steps = list_step_dirs(root)
    if not steps:
        entries = sorted(os.listdir(root))
        shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") if entries else "nothing"
        raise CheckpointError(f"{root}: holds no checkpoint (found: {shown}); name {CHECKPOINT_NAMING}")
    latest = find_latest_checkpoint(root)
    if latest is None:
        reasons = "; ".join(f"{os.path.basename(step_dir)}: {why_incomplete(step_dir)}" for _, step_dir in steps)
        raise CheckpointError(f"{root}: holds {len(steps)} step_<N> folder(s), none complete ({reasons})")
    return latest
