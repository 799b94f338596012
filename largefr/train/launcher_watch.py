"""Signals from a scheduler reach the ranks, whichever launcher process they were sent to.

A scheduler stops a job by signalling one process, the one it started: `deepspeed ...` or
`python launch/train.py --world N`. DeepSpeed 0.19.8's runner does not forward SIGTERM/SIGINT on one
machine (it dies at once and its `launch.py` child, which would, never hears of it), so the ranks trained on
to the end. Two parts close that gap:

* every rank started by a launcher watches the launcher processes above it (`watch_launcher`): when one
  of them ends, the rank signals itself SIGTERM, so the loop checkpoints at the same step on every rank
  and exits 0 (largefr.train.trainer.StopSignal). It also covers a launcher killed with SIGKILL;
* `python launch/train.py --world N` (largefr.train.local_launch) starts DeepSpeed's launcher in a session of
  its own and forwards SIGTERM/SIGINT straight to the ranks (`SignalForwarder`), so DeepSpeed's launch.py,
  which would SIGKILL ranks still running 30 s later and exit 1, never sees it; it then exits with the
  ranks' status.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Iterable

LAUNCHER_PROGRAMS = ("deepspeed", "torchrun", "deepspeed.launcher.runner", "deepspeed.launcher.launch",
                     "torch.distributed.run")
"""Programs (a script's name, or a module run with -m) of the launchers that can be above a rank: DeepSpeed's
runner and launch.py, torchrun's agent; `python launch/train.py --world N` is known by its script."""
PROGRAM_ARGS = 4
"""Command-line words searched for the program: the interpreter, its options, then the script or -m module
(a later word, such as a --config path, never makes a process a launcher)."""
POLL_S = 1.0


def process_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone or has ended (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def argv(pid: int) -> list[str]:
    """The command line of `pid`, as words ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_launcher(words: list[str], script: str = os.path.join("launch", "train.py")) -> bool:
    """True when the command line `words` runs one of the LAUNCHER_PROGRAMS, or `script` (our --world launcher)."""
    head = words[:PROGRAM_ARGS]
    if any(os.path.basename(word) in LAUNCHER_PROGRAMS for word in head):
        return True
    local_launch = any(word.startswith("--world") for word in words) and \
        not any(word.startswith(("--local_rank", "--local-rank")) for word in words)  # a rank has the latter
    return local_launch and any(word.endswith(script) for word in head)


Ancestor = tuple[int, tuple[int, int], str]
"""(pid, (parent pid, start time), command line) of a launcher process above a rank."""


def launcher_ancestors(pid: int | None = None) -> list[Ancestor]:
    """Each launcher process above `pid` (this process), nearest first, from Linux /proc."""
    found: list[Ancestor] = []
    parent = (process_stat(os.getpid() if pid is None else pid) or (0, 0))[0]
    while parent > 1:
        stat, words = process_stat(parent), argv(parent)
        if stat is None or not is_launcher(words):
            break
        found.append((parent, stat, " ".join(words)))
        parent = stat[0]
    return found


def first_ended(ancestors: Iterable[Ancestor]) -> tuple[int, str] | None:
    """The first launcher above that ended: gone, a zombie, its pid reused, or its own parent gone (reparented)."""
    for pid, stat, command in ancestors:
        if process_stat(pid) != stat:
            return pid, command
    return None


def watch_launcher(launcher: str) -> threading.Thread | None:
    """Under a launcher (deepspeed, torchrun): a daemon thread that SIGTERMs this rank when a launcher above it ends."""
    ancestors = launcher_ancestors() if launcher in ("deepspeed", "torchrun") else []
    if not ancestors:
        return None

    def watch() -> None:
        while (ended := first_ended(ancestors)) is None:
            time.sleep(POLL_S)
        pid, command = ended
        print(f"[rank {os.environ.get('RANK', '0')}] largefr: the launcher process {pid} ({command[:120]}) ended: "
              "stopping as on SIGTERM (a checkpoint at the next step, then exit)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="largefr-launcher-watch", daemon=True)
    thread.start()
    return thread


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid` (children, their children, ...) with its parent, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        stat = process_stat(int(name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(name))
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            found[child] = parent
            todo.append(child)
    return found


def rank_processes(root: int, script: str) -> list[int]:
    """The ranks below `root`: processes running `script` (not DeepSpeed's launch.py, which names it as an
    argument) whose parent does not run it too (a loader worker forked by a rank has the rank's command line)."""
    below = descendants(root)
    running = {pid for pid in below if script in (words := argv(pid))[:PROGRAM_ARGS] and not is_launcher(words)}
    return sorted(pid for pid in running if below[pid] not in running)


class SignalForwarder:
    """Forwards SIGTERM/SIGINT received by this launcher to the ranks below `root` (processes running `script`)."""

    def __init__(self, root: int, script: str) -> None:
        self.root, self.script = root, script
        self.received: int | None = None
        self._sent: dict[int, int] = {}

    def install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.received = number
        self._sent.clear()  # a second Ctrl-C goes to the ranks again (they then stop at once)
        self.forward()

    def forward(self) -> None:
        """Send the received signal to every rank not sent it yet (ranks that start after it get it too)."""
        if self.received is None:
            return
        for pid in rank_processes(self.root, self.script):
            if pid not in self._sent:
                try:
                    os.kill(pid, self.received)
                    self._sent[pid] = self.received
                except ProcessLookupError:
                    pass
