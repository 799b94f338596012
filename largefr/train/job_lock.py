"""One job per output folder: a `job.lock` file that rank 0 holds (flock) while its run is alive.

The file says who holds it (host, pid, start time, the launch it belongs to). The kernel drops the
flock when the holding process ends however it ends, so a lock whose file is still there but that no
process holds was left by a job that died: the next job takes it over, with one log line naming the
dead one. A second job while the first is alive is refused on every rank, naming the first one's host
and pid. Ranks other than 0 never take the lock: they probe it (a shared flock, released at once) and
read whose it is, so every rank of the second job refuses alike without a process group.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from largefr.errors import UserError

LOCK_NAME = "job.lock"
"""The lock file in the output folder (not a run file: neither a reason to refuse a folder nor deleted)."""
CONTENDED_WAIT_S = 3.0
"""How long a rank retries a lock that is held before it calls the holder another job: covers a peer
rank's probe (microseconds) and this job's rank 0, which writes its name into the file just after taking it."""
RETRY_S = 0.05


class JobLockError(UserError, FileExistsError):
    """The output folder is held by another running job."""


def launch_identity(environ: dict[str, str] | None = None) -> str:
    """What the ranks of one job share and another job does not: the rendezvous address (+ torchrun's id)."""
    env = os.environ if environ is None else environ
    if "MASTER_PORT" not in env or int(env.get("WORLD_SIZE", "1")) < 2:
        return f"{socket.gethostname()} pid {os.getpid()}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    return f"{env.get('MASTER_ADDR', '')}:{env['MASTER_PORT']}" + (f" {run_id}" if run_id else "")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder else "a job that has not written its name yet")


@dataclass
class JobLock:
    """The held lock of this job (rank 0): keep it for the run, `release` it when the run ends."""

    path: Path
    fd: int

    def release(self) -> None:
        """Delete the file, then drop the lock (a waiter that opened the deleted file retries on the new one)."""
        if self.fd < 0:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:  # a lock nobody keeps any more is released, not leaked with its fd
        self.release()


def _refusal(output: Path, holder: dict) -> JobLockError:
    return JobLockError(
        f"output folder {output} is in use by another running job ({_describe(holder)}; {output / LOCK_NAME}); "
        "nothing was changed. Wait for it to end or stop it, or write elsewhere with --set output=DIR")


def _try_lock(path: Path, mode: int) -> int | None:
    """An fd holding `mode` on the file now at `path` (made if missing), or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # released (deleted) by its holder meanwhile
        same_file = False
    if not same_file:
        os.close(fd)
        return None
    return fd


def take_job_lock(output: str | Path, *, log=None) -> JobLock:
    """Rank 0: take `output`/job.lock, creating the folder; JobLockError naming the holder when it is alive."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_NAME
    deadline = time.monotonic() + CONTENDED_WAIT_S
    while (fd := _try_lock(path, fcntl.LOCK_EX)) is None:
        if time.monotonic() > deadline:
            raise _refusal(output, _holder(path))
        time.sleep(RETRY_S)
    stale = _holder(path)
    if stale:
        (log or _print)(f"largefr: took over {path}, left by a job that ended without releasing it "
                        f"({_describe(stale)}; it holds it no longer)")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch_identity(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return JobLock(path=path, fd=fd)


def check_job_lock(output: str | Path) -> None:
    """Ranks other than 0: JobLockError when `output` is held by a live job other than this one's rank 0."""
    path = Path(output) / LOCK_NAME
    deadline = time.monotonic() + CONTENDED_WAIT_S
    while True:
        if not path.exists():
            return
        fd = _try_lock(path, fcntl.LOCK_SH)
        if fd is not None:  # nobody holds it: a dead job's file, which rank 0 takes over
            os.close(fd)
            return
        holder = _holder(path)
        if holder.get("launch") == launch_identity():
            return
        if time.monotonic() > deadline:
            raise _refusal(Path(output), holder)
        time.sleep(RETRY_S)


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
