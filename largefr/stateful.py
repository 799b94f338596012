"""What a checkpoint asks of each stateful part of a run (docs/DESIGN.md section 8).

A part (the loop, the head, its row-sparse optimizer, the bank, the queue, the momentum encoder, ...)
labels its own state by `Kind` and names its own entries; the checkpointer
(`largefr/checkpoint/train_state.py`) only routes the kinds to files, checks presence and shapes, and
re-splits ROWS by class id: it knows no field names. This module imports nothing of largefr (torch only),
so every room that holds state implements the protocol without importing the checkpoint room.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, Protocol

import torch


class Kind(Enum):
    """How an entry of a part's state maps to ranks."""

    ROWS = "rows"
    """Tensors whose dim 0 is this rank's classes in class order (`ClassPartition`): written in this rank's head
    file, re-split by class id on another world size. Given live, never copied: a restore reads into them."""
    REPLICATED = "replicated"
    """Identical on every rank: written once by rank 0 (`replicated.pt`), restored on every rank at any world size."""
    PER_RANK = "per_rank"
    """This rank's own (sampling generators, RNG streams): written in its head file and restored on the same
    world size only; on another one the part keeps what it has (its construction seed)."""


State = dict[Kind, dict[str, Any]]
"""A part's state: per kind, entry name (as written on disk) -> value (tensors, plain data, state dicts)."""


@dataclass(frozen=True)
class EntryNote:
    """What a checkpoint entry is and what makes it exist or sets its shape, for error messages. Entries with the
    same note are named together ("the learnable temperatures ['log_tau', 'contrastive_log_tau']")."""

    what: str
    """e.g. "the cluster bank's rows"."""
    made_by: str
    """e.g. "the cluster terms: cluster.cg_margin or a cluster loss weight"."""


@dataclass(kw_only=True)
class RestoreContext:
    """What a part may need besides its saved state when it is restored."""

    step: int
    """The resumed step (optimizer steps completed)."""
    notify: Callable[[str], None] = print
    """Where a part says what it could not restore as saved (a sampler re-seeded, ...): the run's log."""


class Stateful(Protocol):
    """A part of the run that a checkpoint saves and restores."""

    def checkpoint_state(self) -> State:
        """This part's state by kind, under the names it is written with. ROWS: the live tensors (the restore
        fills the same ones); a ROWS entry on the meta device is state not created yet (an optimizer that has
        not stepped): it is not written, and a restore creates it when the checkpoint has it."""

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        """Put back saved state: ROWS already filled in the tensors `checkpoint_state` gave (or created for
        meta entries); REPLICATED and PER_RANK as saved. A kind left out (PER_RANK on another world size)
        keeps what the part has."""

    def checkpoint_note(self, name: str) -> EntryNote | None:
        """What entry `name` is and which config setting makes it, for error messages; None when it is not this
        part's. Answers for every entry this kind of part may write, present in this run or not."""


def merge_states(*states: State) -> State:
    """One state from the states of a part's pieces (a head and its bank); a name given twice is a bug."""
    merged: State = {kind: {} for kind in Kind}
    for state in states:
        for kind, entries in state.items():
            twice = sorted(set(entries) & set(merged[kind]))
            if twice:
                raise ValueError(f"checkpoint entries {twice} ({kind.value}) are given by two pieces of one part")
            merged[kind].update(entries)
    return merged


def select(state: State, names_of: State) -> State:
    """The entries of `state` whose names `names_of` has, kind by kind (a piece's share of its owner's state)."""
    return {kind: {name: entries[name] for name in names_of.get(kind, {}) if name in entries}
            for kind, entries in state.items()}


# ---------------------------------------------------------------------------------------------
# Sampling generators (Partial FC, center sampling): their state belongs to one device type

_CPU_GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()  # mt19937: 5056; CUDA's Philox: 16


def capture_generator_state(generator: torch.Generator) -> dict[str, Any]:
    """`generator`'s state with the device type it belongs to (a CUDA state does not fit a CPU generator)."""
    return {"device_type": generator.device.type, "state": generator.get_state()}


def reseed_value(initial_seed: int, step: int) -> int:
    """The seed a generator restarts from when its saved state is of another device type.

    Depends only on the generator's construction seed (train.seed and the rank) and the resumed
    step, so every resume of that checkpoint on that device type draws the same stream.
    """
    return (initial_seed + 0x9E37_79B9_7F4A_7C15 * (step + 1)) % 2**64


def restore_generator_state(generator: torch.Generator, saved: Any, *, step: int) -> bool:
    """Put a `capture_generator_state` result back; True if restored, False if re-seeded.

    A state saved on another device type (CUDA <-> CPU) cannot be set: `generator` is re-seeded
    with `reseed_value(generator.initial_seed(), step)` instead. A bare state tensor (checkpoints
    written before the device type was recorded) is typed by its size.
    """
    if torch.is_tensor(saved):
        saved = {"device_type": "cpu" if saved.numel() == _CPU_GENERATOR_STATE_BYTES else "cuda", "state": saved}
    if saved["device_type"] == generator.device.type:
        generator.set_state(saved["state"])
        return True
    generator.manual_seed(reseed_value(generator.initial_seed(), step))
    return False


def restore_samplers(samplers: dict[str, torch.Generator], saved: dict[str, Any], context: RestoreContext) -> None:
    """Each sampler's saved state (`capture_generator_state`); one line names those re-seeded for another device
    type."""
    reseeded = [name for name, generator in samplers.items()
                if not restore_generator_state(generator, saved[name], step=context.step)]
    if reseeded:
        device = next(iter(samplers.values())).device.type
        context.notify(f"checkpoint step {context.step}: {', '.join(reseeded)} saved on another device type than "
                       f"{device}; re-seeded from train.seed, the rank and the step")


class ReplicatedModule:
    """Mixin of a module whose whole `state_dict()` is identical on every rank (the feature queue, the momentum
    encoder): written once under `CHECKPOINT_NAME`, restored on every rank at any world size."""

    CHECKPOINT_NAME: ClassVar[str]
    CHECKPOINT_NOTE: ClassVar[EntryNote]

    def checkpoint_state(self) -> State:
        return {Kind.REPLICATED: {self.CHECKPOINT_NAME: self.state_dict()}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        self.load_state_dict(state[Kind.REPLICATED][self.CHECKPOINT_NAME])

    @classmethod
    def checkpoint_note(cls, name: str) -> EntryNote | None:
        return cls.CHECKPOINT_NOTE if name == cls.CHECKPOINT_NAME else None


class OptimizerState:
    """A torch optimizer of replicated parameters as a checkpoint part: its state dict under `name`."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, note: EntryNote):
        self.optimizer, self.name, self.note = optimizer, name, note

    def checkpoint_state(self) -> State:
        return {Kind.REPLICATED: {self.name: self.optimizer.state_dict()}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        self.optimizer.load_state_dict(state[Kind.REPLICATED][self.name])

    def checkpoint_note(self, name: str) -> EntryNote | None:
        return self.note if name == self.name else None
