"""Run a function on real gloo process groups spawned on this machine (CPU).

The helpers live in the library (`largefr.distributed.spawn`), shared with the head benchmark.
"""
from __future__ import annotations

from typing import Any, Callable

from largefr.distributed.spawn import free_port, run_ranks

__all__ = ["free_port", "run_distributed"]


PRELOAD = ("torch", "torch.distributed", "deepspeed", "largefr.train.build")
"""Imported once by the fork server every test's ranks are forked from (a fresh interpreter importing torch and
DeepSpeed costs each rank seconds, hundreds of times a suite)."""


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return each rank's result.

    `fn` must be a module-level function (it is pickled into the ranks). A failure on any rank raises
    here with that rank's traceback.
    """
    return run_ranks(fn, world_size, *args, preload=PRELOAD)
