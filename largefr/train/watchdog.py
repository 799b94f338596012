"""Hang watchdog: every rank publishes where it is; a rank that stops is named and the job ends in bounded time.

The trainer's main thread marks its place in a `Heartbeat` (step and phase: 'data', 'step', 'evaluate',
'checkpoint'), which costs an attribute write. A `HangWatchdog` thread of every rank publishes it every
`poll_s` to the rendezvous TCPStore (a connection of its own, so it works while the main thread is blocked
in a gloo or NCCL collective) and reads every peer's; a second thread, which never touches the store (a
read from a stopped store host never returns), judges. It ends the job when

* a peer's heartbeat has not changed for `train.hang_timeout_s`: that process is not running (SIGSTOP, a
  frozen or swapping machine, a lost node); its thread would publish even if its main thread were stuck;
* the store itself has not answered for that long (rank 0's process, which hosts it, is not running);
* this rank's main thread has not left a 'data' or 'step' phase for `train.hang_timeout_s` (or 10 times its
  median step time, when longer): a rank stuck but alive, or a collective that never completes; a process's
  first step and the data before it (compilation, warm-up, a resume's skip to its batch) and evaluation or
  checkpoint phases are not timed this way.

Then it prints which rank stopped, in which phase and step, and every rank's last heartbeat, dumps the
stack of every thread of its own process (faulthandler) and exits with EXIT_ERROR, without waiting on
anything: a checkpoint being written is left as a `.tmp-` folder, so the last complete one stays resumable.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Callable

STALL_PHASES = ("data", "step")
"""Phases whose length is bounded by the step time, so a rank that stays in one too long is stuck."""
STEP_TIME_FACTOR = 10.0
"""A stall is called after max(train.hang_timeout_s, STEP_TIME_FACTOR x the median recent step time)."""
SILENT_POLLS = 5
"""A peer whose heartbeat missed this many polls is named as not answering in a hang report."""
KEY_PREFIX = "heartbeat_of_rank_"
"""Store key of each rank's heartbeat (+ the rank); DeepSpeed's and torch's keys never start so."""


class Heartbeat:
    """Where this rank's main thread is: (optimizer steps done, phase, monotonic time it entered the phase).

    The trainer calls `beat`; the watchdog thread reads `now`. One tuple assignment, so a reader never
    sees a half-updated state.
    """

    def __init__(self) -> None:
        self.now: tuple[int, str, float] = (0, "start", time.monotonic())
        self.first_step: int | None = None
        self.step_seconds: deque[float] = deque(maxlen=20)

    def beat(self, step: int, phase: str) -> None:
        _, previous_phase, since = self.now
        moment = time.monotonic()
        if previous_phase == "step":
            self.step_seconds.append(moment - since)
        if self.first_step is None and phase == "step":
            self.first_step = step
        self.now = (step, phase, moment)

    def stall_limit_s(self, timeout_s: float) -> float:
        recent = list(self.step_seconds)
        return max(timeout_s, STEP_TIME_FACTOR * statistics.median(recent)) if recent else timeout_s


def _describe(rank: int, beat: dict, now: float, seen: float) -> str:
    if not beat:
        return f"rank {rank}: no heartbeat yet"
    phase_s = beat.get("phase_s", 0.0) + (now - seen)
    return (f"rank {rank}: {beat.get('step', '?')} steps done, phase '{beat.get('phase', '?')}' for {phase_s:.0f} s "
            f"(host {beat.get('host', '?')} pid {beat.get('pid', '?')}), heartbeat {now - seen:.0f} s old")


class HangWatchdog:
    """Publishes `heartbeat` to the store at `address` and ends the process when a rank hangs (module docstring).

    poll_s: seconds between heartbeats and between judgements (default a tenth of the timeout, 0.5 to 10 s).
    """

    def __init__(self, heartbeat: Heartbeat, *, rank: int, world_size: int, address: tuple[str, int],
                 timeout_s: float, report: Callable[[str], None], exit_code: int = 1,
                 poll_s: float | None = None) -> None:
        self.heartbeat, self.rank, self.world_size, self.address = heartbeat, rank, world_size, address
        self.timeout_s, self.report, self.exit_code = timeout_s, report, exit_code
        self.poll_s = poll_s if poll_s is not None else min(max(timeout_s / 10, 0.5), 10.0)
        self._stop = threading.Event()
        # Two threads: a store call to a stopped host blocks for good (TCPStore reads have no timeout), so the
        # one that talks to the store is never the one that decides.
        self._threads = [threading.Thread(target=self._judge, name="largefr-hang-watchdog", daemon=True),
                         threading.Thread(target=self._courier, name="largefr-heartbeat", daemon=True)]
        self._store = None
        self._seq = 0
        started = time.monotonic()
        self._last_store_answer = started
        self._peers: dict[int, tuple[dict, float]] = {r: ({}, started) for r in range(world_size) if r != rank}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HangWatchdog":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop both threads; the courier publishes phase 'done', so peers still at work do not take this rank
        for hung (not waited for longer than a store call may take)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.poll_s + self._store_timeout_s())

    def _judge(self) -> None:
        while not self._stop.wait(self.poll_s):
            verdict = self.verdict(time.monotonic())
            if verdict is not None:
                self._end(verdict)

    def _courier(self) -> None:
        while not self._stop.is_set():
            self._publish(self.heartbeat.now)
            self._read_peers()
            self._stop.wait(self.poll_s)
        step, _, _ = self.heartbeat.now
        self._publish((step, "done", time.monotonic()))

    # ---- the store ------------------------------------------------------------------------------
    def _store_timeout_s(self) -> float:
        return max(2 * self.poll_s, 5.0)

    def _connect(self):
        if self._store is None:
            import torch.distributed as dist

            self._store = dist.TCPStore(self.address[0], self.address[1], is_master=False, wait_for_workers=False,
                                        timeout=timedelta(seconds=self._store_timeout_s()))
        return self._store

    def _publish(self, now: tuple[int, str, float]) -> None:
        step, phase, since = now
        self._seq += 1
        beat = {"seq": self._seq, "step": step, "phase": phase, "phase_s": round(time.monotonic() - since, 1),
                "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self._connect().set(f"{KEY_PREFIX}{self.rank}", json.dumps(beat))  # no reply: reads tell the store lives
        except Exception:  # noqa: BLE001  (any store failure means the same: its host does not answer)
            self._store = None

    def _read_peers(self) -> None:
        """Every peer's heartbeat: one multi_get once all have published (one request per poll at any scale)."""
        keys = [f"{KEY_PREFIX}{rank}" for rank in self._peers]
        try:
            store = self._connect()
            if store.check(keys):
                values = dict(zip(self._peers, store.multi_get(keys)))
            else:  # start-up: some peers have not published yet
                values = {rank: store.get(key) for rank, key in zip(self._peers, keys) if store.check([key])}
            self.store_answered(time.monotonic())
        except Exception:  # noqa: BLE001
            self._store = None
            return
        for rank, value in values.items():
            self.record(rank, json.loads(value), time.monotonic())

    def store_answered(self, at: float) -> None:
        """The store replied at monotonic time `at`."""
        self._last_store_answer = at

    def record(self, rank: int, beat: dict, at: float) -> None:
        """Peer `rank` published `beat`, read at monotonic time `at` (a new one only if its seq changed)."""
        if beat.get("seq") != self._peers[rank][0].get("seq"):
            self._peers[rank] = (beat, at)

    # ---- the decision ---------------------------------------------------------------------------
    def verdict(self, now: float) -> str | None:
        """The hang report when this rank should end the job now, else None."""
        live = {r: (beat, seen) for r, (beat, seen) in self._peers.items() if beat.get("phase") != "done"}
        silent = sorted(r for r, (_, seen) in live.items() if now - seen > self.timeout_s)
        store_silent = now - self._last_store_answer > self.timeout_s
        step, phase, since = self.heartbeat.now
        first = self.heartbeat.first_step  # until this process's first step is done, nothing is timed
        stalled = (phase in STALL_PHASES and first is not None and step > first
                   and now - since > self.heartbeat.stall_limit_s(self.timeout_s))
        if not (silent or store_silent or stalled):
            return None
        return self._report(now, live, store_silent, stalled)

    def _report(self, now: float, live: dict[int, tuple[dict, float]], store_silent: bool, stalled: bool) -> str:
        step, phase, since = self.heartbeat.now
        quiet = sorted(r for r, (_, seen) in live.items() if now - seen > SILENT_POLLS * self.poll_s)
        limit = f"train.hang_timeout_s={self.timeout_s:g}"
        if store_silent and self.rank != 0:
            host, port = self.address
            headline = (f"the rendezvous store at {host}:{port} (in rank 0's process) has not answered for "
                        f"{now - self._last_store_answer:.0f} s ({limit}): rank 0 is stopped, frozen or unreachable")
        elif quiet:
            names = ", ".join(map(str, quiet))
            oldest = max(now - live[r][1] for r in quiet)
            headline = (f"rank {names} stopped answering: no heartbeat for {oldest:.0f} s ({limit}); its process "
                        "is stopped, frozen or its machine unreachable")
        else:
            behind = self._ranks_behind(live, (step, phase))
            who = f"rank {', '.join(map(str, behind))} is behind the others" if behind else \
                "every rank is in the same phase (a collective that never completes)"
            headline = (f"no progress for {now - since:.0f} s in phase '{phase}' with {step} steps done "
                        f"(limit {self.heartbeat.stall_limit_s(self.timeout_s):.0f} s, {limit}): {who}")
        peers = [_describe(r, beat, now, seen) for r, (beat, seen) in sorted(self._peers.items())]
        mine = f"rank {self.rank} (this one): {step} steps done, phase '{phase}' for {now - since:.0f} s"
        return "\n".join([f"hang: {headline}. Last heartbeats:", f"  {mine}", *[f"  {p}" for p in peers],
                          "Every rank ends; rerun with --resume auto to continue from the last complete checkpoint"])

    def _ranks_behind(self, live: dict[int, tuple[dict, float]], mine: tuple[int, str]) -> list[int]:
        order = {name: index for index, name in enumerate(("start", *STALL_PHASES, "evaluate", "checkpoint"))}
        places = {r: (beat.get("step", -1), order.get(beat.get("phase"), -1)) for r, (beat, _) in live.items()}
        places[self.rank] = (mine[0], order.get(mine[1], -1))
        lowest = min(places.values())
        behind = sorted(r for r, place in places.items() if place == lowest)
        return [] if len(behind) == len(places) else behind

    def _end(self, verdict: str) -> None:
        self.report(verdict)
        print(f"[rank {self.rank}] stack of every thread of this rank at the hang:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(self.exit_code)


class NoWatchdog:
    """What `start_watchdog` returns when nothing is to be watched (one rank, or train.hang_timeout_s 0)."""

    def stop(self) -> None:
        pass


def start_watchdog(heartbeat: Heartbeat, *, rank: int, world_size: int, timeout_s: float,
                   report: Callable[[str], None], exit_code: int = 1) -> HangWatchdog | NoWatchdog:
    """A started watchdog on the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT) for a multi-rank run."""
    if world_size < 2 or not timeout_s:
        return NoWatchdog()
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return HangWatchdog(heartbeat, rank=rank, world_size=world_size, address=address, timeout_s=timeout_s,
                        report=report, exit_code=exit_code).start()
