"""Disk faults of the files a run writes (checkpoints, train.log), named with the folder and its free space.

A full disk shows up in many shapes: `OSError` ENOSPC from a plain write, EFBIG under a file-size
limit (`ulimit -f`), EDQUOT under a quota, EIO from a failing disk or network file system, and
`RuntimeError("[enforce fail at inline_container.cc...] unexpected pos ...")` from `torch.save`
writing to a path (its C++ writer drops the errno). `describe_write_failure` turns each into one
sentence naming the file or folder, the bytes free there and what to do; `check_free_space` refuses
a save that cannot fit before anything is written.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
from typing import Any

import torch

from largefr.errors import UserError

WRITE_ERRNO_MEANING = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file reached the file-size limit (ulimit -f)",
    errno.EIO: "an I/O error: the disk or network file system failed",
    errno.EROFS: "the file system is read-only",
}
"""Errnos of a failed write that are the storage's fault, not the program's, and what each means."""

NEARLY_FULL_BYTES = 64 << 20
"""Free space under which a write failure without an errno is put down to a full disk."""


class StorageError(UserError, OSError):
    """A file of the run could not be written: no space, a quota or size limit, an I/O error."""


def format_bytes(count: float) -> str:
    """`count` bytes in the largest binary unit that keeps it >= 1 (e.g. '36.2 MiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path` (or its nearest
    existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in `value` (nested dicts, lists and tuples): what torch.save writes, less headers."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def check_free_space(folder: str, needed: int, what: str, basis: str) -> None:
    """Raise StorageError when `folder`'s file system has less than `needed` bytes free.

    what: the thing to be written ('checkpoint step_40'); basis: where `needed` comes from.
    """
    free = free_bytes(folder)
    if free < needed:
        raise StorageError(
            f"{what} needs about {format_bytes(needed)} ({basis}) but {folder} has {format_bytes(free)} free "
            f"({free} of {needed} bytes): nothing was written. Free space there or set checkpoint.dir to a "
            "larger disk, then rerun with --resume auto")


def write_errno(error: BaseException) -> int | None:
    """The errno behind a failed write: the error's own, or that of the OSError it was raised from
    (torch.save writing to a Python file object chains the OSError its write raised)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def is_write_failure(error: BaseException) -> bool:
    """True for the errors a failing disk gives (see the module docstring), False for bugs."""
    if write_errno(error) in WRITE_ERRNO_MEANING:
        return True
    return isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "PytorchStreamWriter" in str(error))


def _file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE in bytes, None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def describe_write_failure(error: BaseException, path: str, what: str) -> str:
    """One sentence: `what` could not be written at `path`, why (errno or free space) and what to do."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder)
    number = write_errno(error)
    if number in WRITE_ERRNO_MEANING:
        cause = WRITE_ERRNO_MEANING[number]
    elif free < NEARLY_FULL_BYTES:
        cause = "the disk is full"
    elif _file_size_limit() is not None:
        cause = f"a file probably reached the file-size limit of this process (ulimit -f: {_file_size_limit()} bytes)"
    else:
        cause = "the write failed (a quota or an I/O error; see dmesg)"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"could not write {what} in {folder}: {cause}; {format_bytes(free)} ({free} bytes) free there "
            f"({type(error).__name__}: {first_line})")
