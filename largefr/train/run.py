"""One training run from a config file, with the error handling every rank shares (used by launch/train.py).

Exit codes: 0 finished (or stopped by SIGTERM/SIGINT after writing a checkpoint), 1 a run-time
error with a message (bad data, missing .bin, non-finite loss under 'abort', ...), 2 a config error or an
output folder that holds an earlier run (largefr/train/output_folder.py).
Every rank validates the config and the files itself, so every rank exits with the message; the ranks
that failed meet (bounded) before exiting, since a launcher kills every rank once one exits non-zero.
Set LARGEFR_DEBUG=1 to get the traceback of a reported error.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

from largefr.config import ConfigError, load_config
from largefr.errors import EXPECTED_ERRORS

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def _rank_prefix() -> str:
    return f"[rank {os.environ.get('RANK', '0')}] "


def report(message: str) -> None:
    """Every line prefixed with the rank, so launcher output that interleaves ranks stays readable."""
    lines = str(message).splitlines() or [""]
    text = "\n".join(f"{_rank_prefix()}error: {line}" for line in lines)
    sys.stderr.write(text + "\n")  # one write: print() writes the newline separately, and ranks interleave
    sys.stderr.flush()


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "Timeout", "NCCL communicator was aborted", "ProcessGroupNCCL")


def lost_peer(error: BaseException) -> bool:
    """True when `error` is a collective that failed because another rank ended, hung or the network broke."""
    import torch.distributed as dist

    if isinstance(error, (dist.DistNetworkError, dist.DistBackendError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_LOST)


def limit_cpu_threads() -> None:
    """Share the cores among the ranks of this node unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_ranks, 1)))


def run_training(config_path: str, overrides: Sequence[str] = (), *, resume: str | None = None,
                 overwrite: bool = False, world_size: int = 1) -> int:
    """Load, build, train; returns the process exit code. See output_folder for `resume` and `overwrite`."""
    from largefr.train.distributed_env import meet_after_config_error
    from largefr.train.output_folder import OutputFolderError, claim_output_folder

    try:
        config = load_config(config_path, overrides, world_size=world_size)
    except ConfigError as error:
        report(str(error))
        meet_after_config_error()
        return EXIT_CONFIG
    try:
        job_lock = claim_output_folder(config.output, str(config.checkpoint_dir), overwrite=overwrite,
                                       resume=resume if resume is not None else config.checkpoint.resume,
                                       rank=int(os.environ.get("RANK", "0")))
    except OutputFolderError as error:
        report(str(error))
        meet_after_config_error()
        return EXIT_CONFIG
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import (detect_launcher, init_distributed, meet_failed_ranks,
                                               shutdown_distributed)
    from largefr.train.launcher_watch import watch_launcher
    from largefr.train.watchdog import start_watchdog

    finished = False
    env = None
    try:
        watch_launcher(detect_launcher())  # a launcher that ends (a scheduler's SIGTERM) stops this rank cleanly
        env = init_distributed(timeout_s=config.train.collective_timeout_s)
        if env.device.type == "cpu":
            limit_cpu_threads()
        trainer = build_trainer(config, env, resume=resume)
        watchdog = start_watchdog(trainer.heartbeat, rank=env.rank, world_size=env.world_size,
                                  timeout_s=config.train.hang_timeout_s, report=report, exit_code=EXIT_ERROR)
        try:
            trainer.train()
        finally:
            watchdog.stop()
            trainer.metrics.close()
        finished = True
    except EXPECTED_ERRORS as error:
        if os.environ.get("LARGEFR_DEBUG"):
            raise
        report(str(error))
        if env is not None:
            meet_failed_ranks(env.meeting_group)  # every rank prints its error before the launcher kills the rest
        return EXIT_ERROR
    except RuntimeError as error:
        if not lost_peer(error) or os.environ.get("LARGEFR_DEBUG"):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        report(f"a collective failed: another rank ended, was killed or stopped answering within "
               f"train.collective_timeout_s ({first_line}). The first rank to fail says why in its log; rerun "
               "with --resume auto to continue from the last checkpoint")
        return EXIT_ERROR
    finally:
        shutdown_distributed(wait_for_peers=finished)
        if job_lock is not None:
            job_lock.release()
    return EXIT_OK
