"""The parts' state (`largefr.stateful`) routed to a checkpoint's files and back, knowing no field names.

Kinds go to files: ROWS to each rank's head file (re-split by class id on another world size), PER_RANK to
the `extra` of the same file, REPLICATED to `replicated.pt`. On restore every entry a part gives must be in
the checkpoint and every saved entry must be restored by a part (or belong to a part left out: the
optimizers under checkpoint.reset_optimizer); tensors of a replicated entry must keep their shapes. Each
refusal names the file, the entry, and what the entry is with the setting that makes it
(`Stateful.checkpoint_note`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from largefr.checkpoint.files import CheckpointError, check_shapes
from largefr.stateful import EntryNote, Kind, State

Note = Callable[[str], "EntryNote | None"]
"""What an entry is, by name (a part's `checkpoint_note`); None when it is not that part's."""

FIX = "resume with the settings it was written with"


def merge_kind(states: Mapping[str, State], kind: Kind) -> dict[str, Any]:
    """Every part's entries of `kind` in one mapping; an entry given by two parts is refused naming both."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for part, state in states.items():
        for name, value in state.get(kind, {}).items():
            if name in owner:
                raise ValueError(f"checkpoint entry '{name}' ({kind.value}) is given by parts '{owner[name]}' and "
                                 f"'{part}': each entry needs one owner")
            merged[name], owner[name] = value, part
    return merged


def rows_to_write(states: Mapping[str, State]) -> dict[str, torch.Tensor]:
    """The parts' rows, less the state not created yet (meta tensors: an optimizer before its first step)."""
    return {name: rows for name, rows in merge_kind(states, Kind.ROWS).items() if not rows.is_meta}


def describe(notes: Iterable[Note], name: str) -> EntryNote | None:
    return next((note for note in (source(name) for source in notes) if note is not None), None)


@dataclass(frozen=True)
class Mismatch:
    """Saved entries against the entries this run gives, in one file (or kind of file)."""

    path: str
    where: str
    saved: list[str]
    """The saved entries that a part of this run could restore (less the checkpointer's own and those of parts
    left out)."""
    wanted: list[str]
    missing: list[str]
    """Entries this run needs that the checkpoint lacks."""

    def problems(self, notes: list[Note], parts: Iterable[str]) -> list[str]:
        """One sentence per group of entries with the same note (the learnable temperatures, the bank's rows)."""
        unexpected = [name for name in self.saved if name not in self.wanted]
        groups: dict[EntryNote | None, None] = dict.fromkeys(describe(notes, n) for n in self.missing + unexpected)
        return [self._sentence(note, notes, parts) for note in groups]

    def _sentence(self, note: EntryNote | None, notes: list[Note], parts: Iterable[str]) -> str:
        def described(names: list[str]) -> list[str]:
            return [name for name in names if describe(notes, name) == note]

        saved, wanted, lacking = described(self.saved), described(self.wanted), described(self.missing)
        if note is None:  # entries no part describes: saved by a part this run has not, or undescribed
            said = [f"holds {[name for name in saved if name not in wanted]}, which no part of this run restores"
                    f" (parts: {', '.join(parts)})"] if set(saved) - set(wanted) else []
            return f"checkpoint {self.path} ({self.where}) " + " and ".join(said + [f"lacks {lacking}"] * bool(lacking))
        where = f"({self.where}; {note.made_by})"
        if lacking and not saved:
            return f"checkpoint {self.path} lacks {note.what} {lacking} {where}"
        if not wanted:
            return f"checkpoint {self.path} holds {note.what} {saved}, which this run does not have {where}"
        return f"checkpoint {self.path} holds {note.what} {saved}, this run has {wanted} {where}"


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}: {FIX}")


@dataclass(frozen=True)
class RowPlan:
    """Where the saved rows go: name -> destination tensor of this rank's classes, and the rows not read."""

    destinations: dict[str, torch.Tensor]
    skipped: list[str]


def plan_rows(path: str, saved: Mapping[str, Any], live: Mapping[str, State], *, left_out: Iterable[Note],
              notes: Iterable[Note], device: torch.device) -> RowPlan:
    """The destinations of the saved rows (manifest['rows']): the live tensors of the parts restored, and new
    empty tensors for rows a part has not created yet (meta). Saved rows of a part left out (`left_out`: the
    optimizers under checkpoint.reset_optimizer) are skipped; any other saved row no part restores, or a
    created row the checkpoint lacks, is refused."""
    wanted = merge_kind(live, Kind.ROWS)
    notes, left_out = list(notes), list(left_out)
    skipped = [name for name in saved if name not in wanted and describe(left_out, name) is not None]
    mismatch = Mismatch(path=path, where="the head files", saved=[name for name in saved if name not in skipped],
                        wanted=list(wanted), missing=[name for name, rows in wanted.items()
                                                      if name not in saved and not rows.is_meta])
    _raise_problems(mismatch.problems(notes, live))
    destinations = {name: torch.empty(rows.shape, dtype=rows.dtype, device=device) if rows.is_meta else rows
                    for name, rows in wanted.items() if name in saved}
    return RowPlan(destinations=destinations, skipped=skipped)


def check_entries(path: str, file: str, kind: Kind, saved: Mapping[str, Any], live: Mapping[str, State], *,
                  left_out: Iterable[Note], notes: Iterable[Note], own: Iterable[str] = ()) -> None:
    """The saved entries of `kind` (from `file`) against those the parts give: present both ways (less the
    checkpointer's `own` entries and those of parts left out); REPLICATED tensors of the same shapes."""
    wanted = merge_kind(live, kind)
    notes, left_out, own = list(notes), list(left_out), set(own)
    mismatch = Mismatch(path=path, where=file, wanted=list(wanted),
                        saved=[name for name in saved if name not in own and describe(left_out, name) is None],
                        missing=[name for name in wanted if name not in saved])
    _raise_problems(mismatch.problems(notes, live))
    if kind is Kind.REPLICATED:  # per-rank state (a generator's) takes another shape on another device type
        for name, value in wanted.items():
            note = describe(notes, name)
            what = f"{note.what} ({note.made_by})" if note is not None else "a part of the run"
            fix = f"'{name}' is {what}: it was written with other settings or modified; resume with the config it " \
                  "was written with or from an earlier checkpoint"
            check_tree(os.path.join(path, file), name, saved[name], value, fix)


def check_tree(file: str, key: str, saved: Any, live: Any, fix: str) -> None:
    """Tensors of `live` against those at the same place in `saved`, by shape; a state dict (a mapping of
    tensors only) must have the same keys too. Lists and empty mappings (a fresh optimizer's state) are not
    compared."""
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != live.shape:
            shown = list(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise CheckpointError(f"{file}: key '{key}' has shape {shown}, this run's is {list(live.shape)}; {fix}")
    elif isinstance(live, Mapping) and live:
        if live and all(isinstance(value, torch.Tensor) for value in live.values()):
            check_shapes(file, key, saved, live, fix)
            return
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"{file}: '{key}' is a {type(saved).__name__}, not a mapping; {fix}")
        missing = sorted(str(name) for name in live if name not in saved)
        if missing:
            raise CheckpointError(f"{file}: '{key}' lacks keys {missing[:5]}; {fix}")
        for name, value in live.items():
            check_tree(file, f"{key}.{name}", saved[name], value, fix)


def share_of(live: State, rows: Mapping[str, torch.Tensor], replicated: Mapping[str, Any] | None,
             per_rank: Mapping[str, Any] | None) -> State:
    """A part's saved state, by the names it gives (`live`); a kind not restored (None) is left out."""
    share: State = {Kind.ROWS: {name: rows[name] for name in live.get(Kind.ROWS, {}) if name in rows}}
    for kind, saved in ((Kind.REPLICATED, replicated), (Kind.PER_RANK, per_rank)):
        if saved is not None:
            share[kind] = {name: saved[name] for name in live.get(kind, {})}
    return share
