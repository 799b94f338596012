"""This process's random streams (torch, numpy, python, CUDA) as a checkpoint part, kept as plain data
(weights_only-loadable) in its head file: restored on the same world size only (docs/DESIGN.md section 8)."""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

from largefr.stateful import EntryNote, Kind, RestoreContext, State


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """torch (CPU and `device` if CUDA), numpy and python RNG states as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": list(python_state), "gauss": gauss}}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ProcessRandomState:
    """The process's RNG states as a checkpoint part (`largefr.stateful.Stateful`), per rank."""

    def __init__(self, device: torch.device | str | None):
        self.device = device

    def checkpoint_state(self) -> State:
        return {Kind.PER_RANK: {"rng": capture_rng_state(self.device)}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        if Kind.PER_RANK in state:
            restore_rng_state(state[Kind.PER_RANK]["rng"], self.device)

    @staticmethod
    def checkpoint_note(name: str) -> EntryNote | None:
        return EntryNote("this process's torch, numpy and python RNG states", "every run") if name == "rng" else None
