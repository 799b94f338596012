"""Ranks on this machine: a free TCP port, and a function run on N spawned ranks of one process group.

Shared by the tests (gloo ranks at world sizes 1-4), the head benchmark (`largefr.perf.head_bench`)
and the launchers' port choice (`largefr.train.distributed_env`, `largefr.experiments.runner`).
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import tempfile
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it), for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, result_dir: str, backend: str, threads: int,
            fn: Callable, args: tuple, environment: dict[str, str] | None) -> None:
    if environment is not None:  # a forkserver's child starts with the server's environment, not the caller's
        os.environ.clear()
        os.environ.update(environment)
    faulthandler.enable()  # a rank that aborts in C++ (SIGABRT, SIGSEGV) prints where its Python stood
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    finished = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        if finished and world_size > 1:  # no rank closes its connections while a peer still reads from them
            dist.barrier()
        dist.destroy_process_group()
    # Work done and saved: skip interpreter finalization, where torch's gloo threads now and then abort a
    # finished process (SIGABRT, "terminate called without an active exception"; see launch/train.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads: int = 1, preload: Sequence[str] = ()) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; return each rank's result.

    The ranks share a process group of `backend` ('nccl': rank r on cuda:r) and use `threads` CPU
    threads each. `fn` must be a module-level function (it is pickled into the spawned processes) and
    its result picklable. A failure on any rank raises here with that rank's traceback.

    `preload`: modules (say torch and DeepSpeed) imported once by a fork server that then forks every
    rank of this and later calls, instead of each rank starting a fresh interpreter and importing them
    (seconds per rank; the test suite's choice). The ranks get the caller's environment as it is at the
    call. Benchmarks leave it empty: a fresh interpreter per rank, nothing inherited.
    """
    method, environment = "spawn", None
    if preload:
        method, environment = "forkserver", dict(os.environ)
        mp.get_context("forkserver").set_forkserver_preload(list(preload))  # used when the server first starts
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), result_dir, backend, threads, fn, args,
                                          environment),
                           nprocs=world_size, join=True, start_method=method)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
