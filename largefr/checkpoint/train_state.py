"""The parts of a training run a checkpoint holds, and their save and restore (docs/DESIGN.md section 8).

Each part labels its own state by kind and names its entries (`largefr.stateful.Stateful`): the loop (the
trainer: loop state, data position), the joint head (W's rows, the Partial-FC and center samplers, the
learnable temperatures, the adaptive margin's running state, and through it the cluster bank's rows and the
feature queue), the head's row-sparse optimizer (its per-row state), the temperatures' optimizer, the
momentum encoder and this process's RNG states. `TrainingCheckpointer` routes the kinds to files, checks
them and re-splits rows by class id (`parts.py`, `save_load.py`); it knows no field names, so a new part
is one more entry of `training_parts` (or of `extra_parts`). The engine (backbone, its optimizer
partitions) is DeepSpeed's own checkpoint inside.

Resume on another device type (saved on GPU, resumed on CPU or back, same world size): a sampling
generator's state is device-specific (CUDA Philox, 16 bytes; CPU mt19937, 5056 bytes), so each
sampler is re-seeded deterministically from its construction seed (train.seed, rank) and the
resumed step (`largefr.stateful.reseed_value`). Everything else resumes as saved; the samplers draw
other Partial-FC negatives and centers than the uninterrupted run would. The CUDA default
generator is restored only on CUDA from a CUDA checkpoint (else it keeps the seed_everything seed).
"""
from __future__ import annotations

import os
import resource
from typing import Any, Mapping

import torch

from largefr.checkpoint.files import REPLICATED_NAME, head_file_name, safe_load, validate_checkpoint
from largefr.checkpoint.parts import Note, check_entries, merge_kind, plan_rows, rows_to_write, share_of
from largefr.checkpoint.resume_config import Rule, check_resume_config
from largefr.checkpoint.rng import ProcessRandomState
from largefr.checkpoint.save_load import LoadedCheckpoint, load_checkpoint, save_checkpoint
from largefr.distributed.collectives import all_gather_rows
from largefr.heads.joint import ClusterGuidedHead
from largefr.heads.momentum import MomentumEncoder
from largefr.stateful import EntryNote, Kind, OptimizerState, RestoreContext, State, Stateful

CONFIG_ENTRY = "config"
"""The replicated entry holding the run's config, compared with the current one on resume (resume_config.py)."""
OWN_ENTRIES = ("step", CONFIG_ENTRY)
"""Replicated entries the checkpointer writes itself (the step: save_load.py), not a part's."""
TAU_OPTIMIZER_NOTE = EntryNote("the learnable temperatures' optimizer state",
                               "cluster.aligning_weight, contrastive_type and temperature_mode; optim.name")


def training_parts(*, head: ClusterGuidedHead, weight_optimizer: torch.optim.Optimizer,
                   tau_optimizer: torch.optim.Optimizer | None, momentum_encoder: MomentumEncoder | None,
                   device: torch.device) -> tuple[dict[str, Stateful], set[str], list[Note]]:
    """(the run's parts by name besides the loop, the names of those holding optimizer state (started afresh
    under checkpoint.reset_optimizer), notes of the optional parts this run has not, for error messages)."""
    parts: dict[str, Stateful] = {"head": head, "head_optimizer": weight_optimizer, "rng": ProcessRandomState(device)}
    tau_note: Note = lambda name: TAU_OPTIMIZER_NOTE if name == "tau_optimizer" else None  # noqa: E731
    absent: list[Note] = []
    if tau_optimizer is not None:
        parts["tau_optimizer"] = OptimizerState(tau_optimizer, "tau_optimizer", TAU_OPTIMIZER_NOTE)
    else:
        absent.append(tau_note)
    if momentum_encoder is not None:
        parts["momentum_encoder"] = momentum_encoder
    else:
        absent.append(MomentumEncoder.checkpoint_note)
    return parts, {"head_optimizer", "tau_optimizer"}, absent


class TrainingCheckpointer:
    """`save(trainer)` / `restore(trainer, path)` of the whole training state; both collective.

    The trainer is the "loop" part (`Trainer.checkpoint_state`) and gives the engine (`trainer.runner.engine`),
    the step (`trainer.state.step`) and the log (`trainer.metrics.info`). extra_parts: more parts by name.
    """

    def __init__(self, root: str, *, head: ClusterGuidedHead, weight_optimizer: torch.optim.Optimizer,
                 tau_optimizer: torch.optim.Optimizer | None, momentum_encoder: MomentumEncoder | None,
                 keep_last: int, config: dict[str, Any], device: torch.device,
                 extra_parts: Mapping[str, Stateful] | None = None):
        self.root = root
        self.partition, self.group = head.partition, head.group  # the head's classes place the rows
        self.tau_optimizer = tau_optimizer  # read by tests of the temperatures' resume
        self.parts, self.optimizer_parts, self.absent_notes = training_parts(
            head=head, weight_optimizer=weight_optimizer, tau_optimizer=tau_optimizer,
            momentum_encoder=momentum_encoder, device=device)
        self.parts.update(extra_parts or {})
        self.keep_last = keep_last
        self.config = config
        self.device = device
        self.last_path: str | None = None

    def _parts(self, trainer) -> dict[str, Stateful]:
        return {"loop": trainer, **self.parts}

    def _notes(self, parts: Mapping[str, Stateful]) -> list[Note]:
        return [part.checkpoint_note for part in parts.values()] + self.absent_notes

    # ---- save ---------------------------------------------------------------------------------
    def states(self, trainer) -> dict[str, State]:
        """Every part's state, by part name."""
        return {name: part.checkpoint_state() for name, part in self._parts(trainer).items()}

    def replicated(self, trainer, states: Mapping[str, State] | None = None) -> dict[str, Any]:
        """What rank 0 writes to replicated.pt: every part's replicated entries and the config."""
        return {**merge_kind(states or self.states(trainer), Kind.REPLICATED), CONFIG_ENTRY: self.config}

    def save(self, trainer) -> str:
        states = self.states(trainer)
        self.last_path = save_checkpoint(
            self.root, trainer.state.step, engine=trainer.runner.engine, partition=self.partition,
            head_rows=rows_to_write(states), head_extra=merge_kind(states, Kind.PER_RANK),
            replicated=self.replicated(trainer, states), keep_last=self.keep_last, group=self.group,
            notify=trainer.metrics.info)
        trainer.metrics.info(f"checkpoint written: {self.last_path}")
        return self.last_path

    # ---- restore ------------------------------------------------------------------------------
    def restore(self, trainer, path: str) -> LoadedCheckpoint:
        fresh_optimizer = self.check_resume_config(trainer, path)
        parts, left_out = self._restored_parts(trainer, fresh_optimizer)
        live = {name: part.checkpoint_state() for name, part in parts.items()}
        notes = self._notes(self._parts(trainer))
        plan = plan_rows(path, validate_checkpoint(path)["rows"], live, left_out=left_out, notes=notes,
                         device=self.device)
        loaded = load_checkpoint(path, engine=trainer.runner.engine, partition=self.partition, group=self.group,
                                 rows=plan.destinations, skip_rows=plan.skipped, fresh_optimizer=fresh_optimizer)
        check_entries(path, REPLICATED_NAME, Kind.REPLICATED, loaded.replicated, live, left_out=left_out,
                      notes=notes, own=OWN_ENTRIES)
        if loaded.head_extra is not None:  # the same world size: this rank's own file
            file = head_file_name(self.partition.rank, self.partition.world_size)
            check_entries(path, file, Kind.PER_RANK, loaded.head_extra, live, left_out=left_out, notes=notes)
        context = RestoreContext(step=loaded.step, notify=trainer.metrics.info)
        for name, part in parts.items():
            part.restore_checkpoint_state(share_of(live[name], plan.destinations, loaded.replicated,
                                                   loaded.head_extra), context)
        self._announce(trainer, loaded, fresh_optimizer)
        return loaded

    def restore_replicated(self, path: str, replicated: Mapping[str, Any], trainer,
                           fresh_optimizer: bool = False) -> None:
        """Only the replicated entries (as read from replicated.pt), checked, into every part."""
        parts, left_out = self._restored_parts(trainer, fresh_optimizer)
        live = {name: part.checkpoint_state() for name, part in parts.items()}
        check_entries(path, REPLICATED_NAME, Kind.REPLICATED, replicated, live, left_out=left_out,
                      notes=self._notes(self._parts(trainer)), own=OWN_ENTRIES)
        context = RestoreContext(step=int(replicated.get("step", trainer.state.step)))  # no per-rank state to note
        for name, part in parts.items():
            part.restore_checkpoint_state(share_of(live[name], {}, replicated, None), context)

    def _restored_parts(self, trainer, fresh_optimizer: bool) -> tuple[dict[str, Stateful], list[Note]]:
        """(the parts restored, the notes of those left out: the optimizers under checkpoint.reset_optimizer)."""
        parts = self._parts(trainer)
        restored = {name: part for name, part in parts.items()
                    if not (fresh_optimizer and name in self.optimizer_parts)}
        return restored, [part.checkpoint_note for name, part in parts.items() if name not in restored]

    def _announce(self, trainer, loaded: LoadedCheckpoint, fresh_optimizer: bool) -> None:
        peaks = ", ".join(f"{peak / 2**30:.2f}" for peak in self._peak_resident_bytes_per_rank())
        optimizer_note = ("; every optimizer state started afresh (checkpoint.reset_optimizer)" if fresh_optimizer
                          else "" if loaded.engine_optimizer_restored else "; engine optimizer re-initialised")
        trainer.metrics.info(f"resumed from {loaded.path} (step {loaded.step}, saved by {loaded.saved_world_size} "
                             f"ranks{optimizer_note}); peak resident memory per rank so far: {peaks} GiB")

    def _peak_resident_bytes_per_rank(self) -> list[float]:
        """Every rank's peak resident memory (the process's high-water mark: build and restore)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return all_gather_rows(torch.tensor([float(peak)], device=self.device), self.group).tolist()

    def check_resume_config(self, trainer, path: str) -> bool:
        """Compare the checkpoint's config with this run's before anything is loaded (resume_config.py);
        every rank reads the same file, so every rank refuses alike. True: start the optimizers afresh."""
        saved = safe_load(os.path.join(path, REPLICATED_NAME), mmap=True).get(CONFIG_ENTRY) or {}  # no tensor read
        reset = bool(self.config.get("checkpoint", {}).get("reset_optimizer", False))
        changed = check_resume_config(path, saved, self.config, reset_optimizer=reset)
        if changed:
            trainer.metrics.info(f"resuming {path} with changed settings: {', '.join(d.change() for d in changed)}")
        return any(difference.rule is Rule.OPTIMIZER for difference in changed)
