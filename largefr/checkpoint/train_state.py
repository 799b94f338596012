"""What a training checkpoint holds, and putting it back (docs/DESIGN.md section 8).

`largefr.checkpoint.save_load` writes and reads the files atomically and re-splits rows by class id;
this module decides which piece of the trainer goes where:

* head rows (this rank's classes, re-split on another world size): classifier rows `weight`, the
  row-sparse optimizer's per-row state `optim.<key>`, the cluster bank `bank.<buffer>`;
* head extras (per rank, dropped on another world size): Partial-FC and center sampling
  generators (each with its device type), this rank's torch/numpy/python RNG states;
* replicated (written by rank 0): momentum encoder, feature queue, the head's replicated
  parameters (`ClusterGuidedHead.replicated_parameters()`, each under its name) and their optimizer,
  the adaptive margin's running state (`margin_state`: CurricularFace's t, AdaFace's norm statistics,
  ElasticFace's CPU generator; world-size and device independent),
  the loop state (step, skip counters, verification), the data position and the config.
The engine (backbone, its optimizer partitions) is DeepSpeed's own checkpoint inside.

Resume on another device type (saved on GPU, resumed on CPU or back, same world size): a sampling
generator's state is device-specific (CUDA Philox, 16 bytes; CPU mt19937, 5056 bytes), so each
sampler is re-seeded deterministically from its construction seed (train.seed, rank) and the
resumed step (`save_load.reseed_value`). Everything else resumes as saved; the samplers draw
other Partial-FC negatives and centers than the uninterrupted run would. The CUDA default
generator is restored only on CUDA from a CUDA checkpoint (else it keeps the seed_everything seed).
"""
from __future__ import annotations

import os
import resource
from typing import Any

import torch

from largefr.checkpoint.files import REPLICATED_NAME, check_shapes, safe_load, validate_checkpoint
from largefr.checkpoint.resume_config import Rule, check_resume_config
from largefr.checkpoint.save_load import (CheckpointError, LoadedCheckpoint, capture_generator_state, capture_rng_state,
                                          load_checkpoint, restore_generator_state, restore_rng_state, save_checkpoint)
from largefr.distributed.collectives import all_gather_rows
from largefr.heads.joint import ClusterGuidedHead


OPTIM_PREFIX = "optim."
"""Head row names of the row-sparse optimizer's per-row state: `optim.<state key>`."""
BANK_PREFIX = "bank."
"""Head row names of the cluster bank's buffers: `bank.<buffer name>`."""


class TrainingCheckpointer:
    """`save(trainer)` / `restore(trainer, path)` of the whole training state; both collective."""

    def __init__(self, root: str, *, head: ClusterGuidedHead, weight_optimizer: torch.optim.Optimizer,
                 tau_optimizer: torch.optim.Optimizer | None, momentum_encoder: torch.nn.Module | None,
                 keep_last: int, config: dict[str, Any], device: torch.device):
        self.root = root
        self.head = head
        self.weight_optimizer = weight_optimizer
        self.tau_optimizer = tau_optimizer
        self.momentum_encoder = momentum_encoder
        self.keep_last = keep_last
        self.config = config
        self.device = device
        self.last_path: str | None = None

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.head.margin_head.weight

    # ---- save ---------------------------------------------------------------------------------
    def head_rows(self) -> dict[str, torch.Tensor]:
        rows = {"weight": self.weight.detach()}
        for key, value in self.weight_optimizer.state.get(self.weight, {}).items():
            rows[f"{OPTIM_PREFIX}{key}"] = value
        if self.head.bank is not None:
            rows.update({f"{BANK_PREFIX}{name}": buffer for name, buffer in self.head.bank.named_buffers()})
        return rows

    def head_extra(self) -> dict[str, Any]:
        return {"margin_sampler": capture_generator_state(self.head.margin_head.sample_generator),
                "center_sampler": capture_generator_state(self.head.sample_generator),
                "rng": capture_rng_state(self.device)}

    def replicated(self, trainer) -> dict[str, Any]:
        state = trainer.state
        out: dict[str, Any] = {
            "loop": {"step": state.step, "consecutive_nonfinite": state.consecutive_nonfinite,
                     "skipped_nonfinite": state.skipped_nonfinite,
                     "best_verification": dict(state.best_verification),
                     "last_verification": dict(state.last_verification)},
            "data_position": trainer.data_position(),
            "config": self.config,
        }
        if self.momentum_encoder is not None:
            out["momentum_encoder"] = self.momentum_encoder.state_dict()
        if self.head.queue is not None:
            out["queue"] = self.head.queue.state_dict()
        parameters = self.head.replicated_parameters()
        out.update({name: parameter.detach() for name, parameter in parameters.items()})
        if parameters:
            out["tau_optimizer"] = self.tau_optimizer.state_dict()
        if self.head.margin_head.adaptive is not None:  # running margin state: identical on every rank
            out["margin_state"] = self.head.margin_head.adaptive.state_dict()
        return out

    def save(self, trainer) -> str:
        self.last_path = save_checkpoint(
            self.root, trainer.state.step, engine=trainer.runner.engine, partition=self.head.partition,
            head_rows=self.head_rows(), head_extra=self.head_extra(), replicated=self.replicated(trainer),
            keep_last=self.keep_last, group=self.head.group, notify=trainer.metrics.info)
        trainer.metrics.info(f"checkpoint written: {self.last_path}")
        return self.last_path

    # ---- restore ------------------------------------------------------------------------------
    def restore(self, trainer, path: str) -> LoadedCheckpoint:
        fresh_optimizer = self.check_resume_config(trainer, path)
        destinations = self.row_destinations(path, fresh_optimizer)
        skipped = [name for name in validate_checkpoint(path)["rows"]
                   if fresh_optimizer and name.startswith(OPTIM_PREFIX)]
        loaded = load_checkpoint(path, engine=trainer.runner.engine, partition=self.head.partition,
                                 group=self.head.group, rows=destinations, skip_rows=skipped,
                                 fresh_optimizer=fresh_optimizer)
        self._adopt_optimizer_rows(destinations)
        if loaded.head_extra is not None:
            self._restore_samplers(trainer, loaded.head_extra, loaded.step)
            restore_rng_state(loaded.head_extra["rng"], self.device)
        self._restore_replicated(path, loaded.replicated, trainer, fresh_optimizer)
        peaks = ", ".join(f"{peak / 2**30:.2f}" for peak in self._peak_resident_bytes_per_rank())
        optimizer_note = ("; every optimizer state started afresh (checkpoint.reset_optimizer)" if fresh_optimizer
                          else "" if loaded.engine_optimizer_restored else "; engine optimizer re-initialised")
        trainer.metrics.info(f"resumed from {path} (step {loaded.step}, saved by {loaded.saved_world_size} ranks"
                             f"{optimizer_note}); peak resident memory per rank so far: {peaks} GiB")
        return loaded

    def _peak_resident_bytes_per_rank(self) -> list[float]:
        """Every rank's peak resident memory (the process's high-water mark: build and restore)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return all_gather_rows(torch.tensor([float(peak)], device=self.device), self.head.group).tolist()

    def _restore_samplers(self, trainer, extra: dict[str, Any], step: int) -> None:
        """The sampling generators' states; re-seeded per step when saved on another device type."""
        samplers = {"margin_sampler": self.head.margin_head.sample_generator,
                    "center_sampler": self.head.sample_generator}
        reseeded = [name for name, generator in samplers.items()
                    if not restore_generator_state(generator, extra[name], step=step)]
        if reseeded:
            trainer.metrics.info(f"checkpoint step {step}: {', '.join(reseeded)} saved on another device type than "
                                 f"{self.device.type}; re-seeded from train.seed, the rank and the step")

    SHAPED_BY = {"queue": "cluster.queue_size or model.embedding_size", "momentum_encoder": "model.network"}
    """What sets the shapes of the replicated state dicts (named when a saved shape does not fit)."""

    def check_resume_config(self, trainer, path: str) -> bool:
        """Compare the checkpoint's config with this run's before anything is loaded (resume_config.py);
        every rank reads the same file, so every rank refuses alike. True: start the optimizers afresh."""
        saved = safe_load(os.path.join(path, REPLICATED_NAME), mmap=True).get("config") or {}  # no tensor read
        reset = bool(self.config.get("checkpoint", {}).get("reset_optimizer", False))
        changed = check_resume_config(path, saved, self.config, reset_optimizer=reset)
        if changed:
            trainer.metrics.info(f"resuming {path} with changed settings: {', '.join(d.change() for d in changed)}")
        return any(difference.rule is Rule.OPTIMIZER for difference in changed)

    def row_destinations(self, path: str, fresh_optimizer: bool = False) -> dict[str, torch.Tensor]:
        """The live tensors the saved head rows are read into, block by block: W, the row-sparse optimizer's
        per-row state (created empty where the optimizer has not stepped yet: it is training memory; left out
        with `fresh_optimizer`) and the bank's buffers. Names, shapes and dtypes are checked against the
        checkpoint by the loader."""
        saved = validate_checkpoint(path)["rows"]
        destinations = {"weight": self.weight.detach()}
        state = self.weight_optimizer.state.get(self.weight, {})
        for name, entry in saved.items():
            if name.startswith(OPTIM_PREFIX) and not fresh_optimizer:
                shape, dtype = (self.weight.shape[0], *entry["shape"]), getattr(torch, entry["dtype"])
                current = state.get(name[len(OPTIM_PREFIX):])
                fits = torch.is_tensor(current) and current.shape == shape and current.dtype == dtype
                destinations[name] = current if fits else torch.empty(shape, dtype=dtype, device=self.weight.device)
        if self.head.bank is not None:
            buffers = dict(self.head.bank.named_buffers())
            missing = [name for name in buffers if f"{BANK_PREFIX}{name}" not in saved]
            if missing:
                raise CheckpointError(f"checkpoint {path} has no cluster bank rows {missing}: it was written with the "
                                      "cluster terms off; resume with the same cluster settings")
            destinations.update({f"{BANK_PREFIX}{name}": buffer for name, buffer in buffers.items()})
        return destinations

    def _adopt_optimizer_rows(self, destinations: dict[str, torch.Tensor]) -> None:
        state = {name[len(OPTIM_PREFIX):]: tensor for name, tensor in destinations.items()
                 if name.startswith(OPTIM_PREFIX)}
        if state:
            self.weight_optimizer.state[self.weight] = state

    def _restore_replicated(self, path: str, replicated: dict[str, Any], trainer,
                            fresh_optimizer: bool = False) -> None:
        loop = replicated["loop"]
        trainer.state.step = loop["step"]
        trainer.state.consecutive_nonfinite = loop["consecutive_nonfinite"]
        trainer.state.skipped_nonfinite = loop["skipped_nonfinite"]
        trainer.state.best_verification = dict(loop["best_verification"])
        trainer.state.last_verification = dict(loop["last_verification"])
        for name, target in (("momentum_encoder", self.momentum_encoder), ("queue", self.head.queue)):
            if (target is None) != (name not in replicated):
                raise CheckpointError(f"checkpoint {path}: '{name}' is {'absent' if target is not None else 'present'}"
                                      " but this run's cluster settings need the opposite; resume with the same "
                                      "cluster section")
            if target is not None:
                check_shapes(os.path.join(path, REPLICATED_NAME), name, replicated[name], target.state_dict(),
                             f"it was written with another {self.SHAPED_BY[name]} or modified; resume with the config "
                             "it was written with or from an earlier checkpoint")
                target.load_state_dict(replicated[name])
        parameters = self.head.replicated_parameters()
        saved = [name for name in self.head.REPLICATED_PARAMETER_NAMES if name in replicated]
        if saved != list(parameters):
            raise CheckpointError(f"checkpoint {path} holds the learnable temperatures {saved}, this run has "
                                  f"{list(parameters)}: it was written with other cluster settings (aligning_weight, "
                                  "contrastive_type, temperature_mode); resume with the same cluster section")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(replicated[name])
        if parameters and not fresh_optimizer:
            self.tau_optimizer.load_state_dict(replicated["tau_optimizer"])
        adaptive = self.head.margin_head.adaptive
        if (adaptive is None) != ("margin_state" not in replicated):
            raise CheckpointError(f"checkpoint {path} {'lacks' if adaptive is not None else 'holds'} the running "
                                  "margin state of head.type curricularface/magface/adaface/elasticface; resume "
                                  "with the head.type it was written with")
        if adaptive is not None:
            adaptive.load_state_dict(replicated["margin_state"])
