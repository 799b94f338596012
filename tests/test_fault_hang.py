"""A hung rank is named and bounded (largefr/train/watchdog.py), on real gloo ranks of `launch/train.py`.

`kill -STOP` of one rank mid-training: every other rank exits non-zero within train.hang_timeout_s plus
BOUND_S, naming the stopped rank with its last phase and step and dumping its own stack; the last complete
checkpoint stays resumable. The slow variants stop rank 0 (which hosts the rendezvous store), and run
beside two CPU-bound processes with the same timeout, then resume from the checkpoint the hang left.
Also: the groups DeepSpeed makes itself get the collective timeout (they had torch's 30 min default).
"""
from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from largefr.checkpoint.save_load import find_latest_checkpoint
from tests.distributed_helpers import run_distributed
from tests.test_reliability_faults import Ranks, fast_config, wait_for
from tests.test_trainer import tiny_data  # noqa: F401  (a fixture)

HANG_TIMEOUT_S = 6.0
BOUND_S = 15.0
"""Detection (one poll, a tenth of the timeout), the report, the stack dump and the exit; on a loaded machine."""


def _cpu_hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _hang_config(data: str, output, max_steps: int = 1000) -> dict:
    return fast_config(data, str(output), schedule={"epochs": 1000}, logging={"every": 1},
                       checkpoint={"every": 2, "keep_last": 10},
                       train={"max_steps": max_steps, "hang_timeout_s": HANG_TIMEOUT_S, "collective_timeout_s": 600})


def _stop_one_rank(tmp_path, data: str, stopped: int) -> tuple[str, float, str]:
    """Train 2 ranks, SIGSTOP rank `stopped` after checkpoint step_2; the other's output, exit delay, checkpoint."""
    output = tmp_path / "out"
    ranks = Ranks(tmp_path, _hang_config(data, output))
    other = 1 - stopped
    try:
        wait_for(lambda: (output / "checkpoints" / "step_2" / "manifest.json").is_file(), 180, ranks)
        # a few heartbeat polls (a tenth of the timeout each) so the other rank has read a beat past start-up:
        # stopped at once, a fast rank could be named with the start-up beat that was all its peer had seen
        time.sleep(3 * HANG_TIMEOUT_S / 10)
        os.kill(ranks.procs[stopped].pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            code = ranks.procs[other].wait(timeout=HANG_TIMEOUT_S + BOUND_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {other} still running {HANG_TIMEOUT_S + BOUND_S + 60} s after rank {stopped} "
                        f"stopped:\n{ranks.output(other)[-3000:]}")
        elapsed = time.monotonic() - started
    finally:
        ranks.kill()  # SIGKILL ends a stopped process too
    text = ranks.output(other)
    assert code == 1, text[-3000:]
    return text, elapsed, find_latest_checkpoint(str(output / "checkpoints"))


def _assert_named(text: str, other: int, stopped: int) -> None:
    if stopped == 0:
        assert re.search(rf"\[rank {other}\] error: hang: the rendezvous store at .* \(in rank 0's process\) has not "
                         r"answered for \d+ s \(train.hang_timeout_s=6\): rank 0 is stopped", text), text[-3000:]
    else:
        assert re.search(rf"\[rank {other}\] error: hang: rank {stopped} stopped answering: no heartbeat for \d+ s "
                         r"\(train.hang_timeout_s=6\)", text), text[-3000:]
    assert re.search(rf"\[rank {other}\] error:   rank {stopped}: \d+ steps done, phase '(data|step|checkpoint)' "
                     rf"for \d+ s \(host \S+ pid \d+\)", text), text[-3000:]
    assert f"[rank {other}] stack of every thread of this rank at the hang:" in text
    assert "most recent call first" in text and "watchdog.py" in text  # faulthandler's dump of this rank


def test_a_stopped_rank_is_named_and_the_other_exits_within_the_hang_timeout(tiny_data, tmp_path):
    text, elapsed, checkpoint = _stop_one_rank(tmp_path, tiny_data, stopped=1)
    assert elapsed < HANG_TIMEOUT_S + BOUND_S, (elapsed, text[-3000:])
    assert elapsed > HANG_TIMEOUT_S - 1, elapsed  # not before the timeout: it waited for the stopped rank
    _assert_named(text, other=0, stopped=1)
    assert checkpoint is not None and int(checkpoint.rsplit("_", 1)[1]) >= 2  # a complete one, found by --resume auto


@pytest.mark.slow
def test_a_stopped_rank_0_is_named_through_its_silent_store(tiny_data, tmp_path):
    text, elapsed, _ = _stop_one_rank(tmp_path, tiny_data, stopped=0)
    assert elapsed < HANG_TIMEOUT_S + BOUND_S, (elapsed, text[-3000:])
    _assert_named(text, other=1, stopped=0)


@pytest.mark.slow
def test_the_hang_is_bounded_under_load_and_its_checkpoint_resumes(tiny_data, tmp_path):
    hogs = _cpu_hogs(2)  # the same timeout as on a quiet machine
    try:
        text, elapsed, checkpoint = _stop_one_rank(tmp_path, tiny_data, stopped=1)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert elapsed < HANG_TIMEOUT_S + BOUND_S, (elapsed, text[-3000:])
    _assert_named(text, other=0, stopped=1)
    resumed_at = int(checkpoint.rsplit("_", 1)[1])
    rerun = Ranks(tmp_path, _hang_config(tiny_data, tmp_path / "out", max_steps=resumed_at + 2),
                  args=("--resume", "auto"), tag="rerun")
    assert rerun.wait(180) == [0, 0], rerun.output(0)[-3000:]
    assert f"step_{resumed_at}" in rerun.output(0)


# ---------------------------------------------------------------------------- DeepSpeed's own groups


def _deepspeed_group_wait(rank: int, world: int, timeout_s: float) -> float | str:
    """Rank 0 all-reduces on the data-parallel group of a real DeepSpeed engine that rank 1 never joins."""
    import deepspeed

    from largefr.train.distributed_env import init_distributed

    init_distributed(timeout_s=timeout_s)
    engine, *_ = deepspeed.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    if rank == 1:
        return "stayed out"
    faulthandler.dump_traceback_later(120, exit=True)  # torch's 30 min default must not hold the test that long
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="[Tt]imed out"):
        torch.distributed.all_reduce(torch.ones(1), group=engine.data_parallel_group)
    faulthandler.cancel_dump_traceback_later()
    return time.monotonic() - started


def test_deepspeeds_data_parallel_group_times_out_after_the_collective_timeout():
    waited, _ = run_distributed(_deepspeed_group_wait, 2, 3.0)
    assert 2.5 < waited < 3.0 + 20, waited


# ---------------------------------------------------------------------------- the decision, from given heartbeats


def _watchdog(rank: int = 0, world: int = 3, timeout_s: float = 10.0):
    from largefr.train.watchdog import Heartbeat, HangWatchdog

    heartbeat = Heartbeat()
    watchdog = HangWatchdog(heartbeat, rank=rank, world_size=world, address=("127.0.0.1", 1), timeout_s=timeout_s,
                            report=print, poll_s=1.0)  # never started: verdict() is asked directly
    return heartbeat, watchdog


def _beat(seq: int, step: int, phase: str) -> dict:
    return {"seq": seq, "step": step, "phase": phase, "phase_s": 0.0, "host": "node1", "pid": 42}


def _at(heartbeat, step: int, phase: str, since: float, first_step: int = 0) -> None:
    heartbeat.first_step, heartbeat.now = first_step, (step, phase, since)


def test_a_silent_peer_is_named_after_the_timeout_and_not_before():
    heartbeat, watchdog = _watchdog()
    _at(heartbeat, 5, "step", since=100.0)
    watchdog.record(1, _beat(1, 5, "step"), at=100.0)
    watchdog.record(2, _beat(1, 5, "checkpoint"), at=100.0)
    watchdog.record(1, _beat(2, 5, "step"), at=109.0)  # rank 1 still publishes, rank 2 went silent at 100
    watchdog.store_answered(109.5)
    assert watchdog.verdict(109.9) is None
    verdict = watchdog.verdict(110.5)
    assert verdict.startswith("hang: rank 2 stopped answering: no heartbeat for 10 s (train.hang_timeout_s=10)")
    assert "rank 2: 5 steps done, phase 'checkpoint' for 10 s (host node1 pid 42), heartbeat 10 s old" in verdict


def test_a_rank_stuck_alive_is_named_as_behind_by_every_rank():
    heartbeat, watchdog = _watchdog(rank=1)
    watchdog.record(0, _beat(7, 5, "step"), at=119.0)  # alive (fresh heartbeats) but stuck in step 6's compute
    watchdog.record(2, _beat(7, 5, "data"), at=119.0)  # stuck reading data: behind the others
    watchdog.store_answered(119.0)
    _at(heartbeat, 5, "step", since=100.0)
    assert watchdog.verdict(109.0) is None
    assert "no progress for 20 s in phase 'step' with 5 steps done (limit 10 s, train.hang_timeout_s=10): " \
           "rank 2 is behind the others" in watchdog.verdict(120.0)
    watchdog.record(2, _beat(8, 5, "step"), at=119.5)
    assert "every rank is in the same phase (a collective that never completes)" in watchdog.verdict(120.0)


def test_first_step_checkpoints_and_evaluation_are_not_timed_and_slow_steps_stretch_the_limit():
    heartbeat, watchdog = _watchdog(world=2)
    watchdog.record(1, _beat(1, 0, "step"), at=1000.0)
    watchdog.store_answered(1000.0)
    for phase, step in (("step", 0), ("checkpoint", 5), ("evaluate", 5)):  # compile/warm-up; saves; verification
        _at(heartbeat, step, phase, since=900.0)
        assert watchdog.verdict(1000.5) is None, phase
    _at(heartbeat, 3, "data", since=900.0, first_step=None)  # a resume reading its way to batch 3, before any step
    assert watchdog.verdict(1000.5) is None
    heartbeat.step_seconds.extend([3.0, 3.0, 4.0])  # 10 x the median step time: 30 s
    _at(heartbeat, 5, "step", since=1000.0 - 25)
    assert watchdog.verdict(1000.5) is None
    _at(heartbeat, 5, "step", since=1000.0 - 31)
    assert "(limit 30 s, train.hang_timeout_s=10)" in watchdog.verdict(1000.5)


def test_a_silent_store_names_rank_0_and_finished_peers_are_not_waited_for():
    heartbeat, watchdog = _watchdog(rank=1, world=2)
    _at(heartbeat, 5, "step", since=100.0, first_step=None)
    watchdog.record(0, _beat(3, 5, "step"), at=100.0)
    watchdog.store_answered(100.0)
    assert "the rendezvous store at 127.0.0.1:1 (in rank 0's process) has not answered for 11 s " \
           "(train.hang_timeout_s=10): rank 0 is stopped" in watchdog.verdict(111.0)
    watchdog.record(0, _beat(4, 9, "done"), at=100.0)  # rank 0 finished; its silence is not a hang
    watchdog.store_answered(110.0)
    _at(heartbeat, 9, "checkpoint", since=100.0)  # this rank's last save, after which it finishes too
    assert watchdog.verdict(111.0) is None
