"""The training loop: `Trainer.train -> Trainer.run_step -> StepRunner.step` (the step itself, one screen).

`Trainer` owns the loop around the step: epochs and resume position, the learning-rate schedule
of backbone and head, logging, periodic verification, checkpoints, SIGTERM/SIGINT and the final
summary. `largefr.train.build.build_trainer` assembles one from a `Config`.
"""
from __future__ import annotations

import copy
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Generator, Iterator, Protocol

import torch

from largefr.distributed.collectives import all_reduce_sum_
from largefr.stateful import EntryNote, Kind, RestoreContext, State
from largefr.train.engine import engine_dtype
from largefr.train.metrics import MetricsLogger, StepTimer
from largefr.train.schedule import LRSchedule
from largefr.train.step import NonFiniteLossError, StepResult, StepRunner
from largefr.train.verifier import Verifier
from largefr.train.watchdog import Heartbeat


class Checkpointer(Protocol):
    def save(self, trainer: "Trainer") -> None: ...


class TrainLoader(Protocol):
    """What the loop needs of a loader (`largefr.data.build_loader`'s dali, torch and synthetic loaders)."""

    skipped_images: int
    """Undecodable images this rank's loader replaced so far (data.on_bad_image=skip)."""

    def __len__(self) -> int:
        """Batches per epoch per rank, equal on every rank."""

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, num_batches: int) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """The current epoch's batches from batch `num_batches` on (a resume mid-epoch)."""


@dataclass(kw_only=True)
class LoopPlan:
    """How long the run is, in optimizer steps, and what it does between steps besides verification
    (the verifier keeps its own cadence, `Verifier.every`)."""

    steps_per_epoch: int
    total_steps: int
    """min(schedule length, train.max_steps)."""
    gradient_accumulation_steps: int
    checkpoint_every: int
    max_consecutive_nonfinite: int
    freeze_backbone_steps: int = 0
    """Steps (from step 0) whose backbone learning rate is 0 (train.freeze_backbone_steps)."""


@dataclass(kw_only=True)
class LoopState:
    """Where the run is; what a checkpoint must restore besides the model and optimizers."""

    step: int = 0
    """Optimizer steps completed."""
    consecutive_nonfinite: int = 0
    skipped_nonfinite: int = 0
    best_verification: dict[str, float] = field(default_factory=dict)
    last_verification: dict[str, float] = field(default_factory=dict)


class StopSignal:
    """Remembers SIGTERM/SIGINT; the step all-reduces it so every rank stops after the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested, self.signal_name = True, signal.Signals(number).name

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class Trainer:
    def __init__(self, *, runner: StepRunner, loader: TrainLoader, schedule: LRSchedule, head_lr_factor: float,
                 plan: LoopPlan, metrics: MetricsLogger, checkpointer: Checkpointer | None = None,
                 verifier: Verifier | None = None, state: LoopState | None = None,
                 summary_fields: dict[str, Any] | None = None, summary_path: str | None = None,
                 stats_fn: Callable[[], dict[str, Any]] | None = None, rank: int = 0, records_left_out: int = 0,
                 nan_steps: frozenset[int] = frozenset()):
        """records_left_out: records of the data set the index scan found not to be images (reported once).
        nan_steps: FAULT INJECTION (train.debug_inject_nan_steps; tests only): 1-based steps whose loss this
        rank makes NaN."""
        self.runner = runner
        self.loader = loader
        self.schedule = schedule
        self.head_lr_factor = head_lr_factor
        self.plan = plan
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.verifier = verifier if verifier is not None and verifier.sets else None
        """Scores the model on the verification sets (None: no data.val_targets)."""
        self.state = state or LoopState()
        self.summary_fields = dict(summary_fields or {})
        self.summary_path = summary_path
        self.stats_fn = stats_fn
        self.rank = rank
        self.records_left_out = records_left_out
        self.nan_steps = nan_steps
        self.stop = StopSignal()
        self.heartbeat = Heartbeat()
        """Where the loop is (steps done, phase), for the hang watchdog (largefr/train/watchdog.py)."""
        self.loss_history: list[torch.Tensor] | None = None
        """Set to [] to record every step's loss (detached tensors; for tests and tools)."""
        self.skipped_images = 0
        """Undecodable images the loaders of all ranks replaced in this process (data.on_bad_image=skip)."""

    # ---- position in the data ---------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.state.step // self.plan.steps_per_epoch

    def data_position(self) -> dict[str, int]:
        """Epoch and micro-batch of that epoch where the next step starts (saved in checkpoints)."""
        steps_into_epoch = self.state.step % self.plan.steps_per_epoch
        return {"epoch": self.epoch, "batch": steps_into_epoch * self.plan.gradient_accumulation_steps}

    def step_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Groups of `gradient_accumulation_steps` micro-batches, from the resume position on.

        The loop's one data iterator (`_loop`; the profiler, `largefr.perf.profiling.profile_steps`,
        drives it too). The position is read from `state.step` at the start of every epoch.
        """
        gas = self.plan.gradient_accumulation_steps
        while True:
            position = self.data_position()
            self.loader.set_epoch(position["epoch"])
            steps_left = self.plan.steps_per_epoch - position["batch"] // gas
            iterator = self.loader.iter_from(position["batch"])
            for _ in range(steps_left):
                group = [next(iterator, None) for _ in range(gas)]
                if any(item is None for item in group):
                    raise RuntimeError(
                        f"the loader ran out of batches in epoch {position['epoch']} before "
                        f"{self.plan.steps_per_epoch} steps: data.num_images is larger than the images the "
                        "loader reads; set data.num_images to the real count")
                yield group
            iterator.close()

    # ---- layer 0: the run -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until total_steps (or a stop signal); verify, checkpoint and summarize at the end."""
        started = time.perf_counter()
        self.stop.install()
        if self.records_left_out:
            self.metrics.info(f"data: {self.records_left_out} records that are not images are left out "
                              "(data.on_bad_image=skip)")
        try:
            if self.state.step == 0 and self.verifier is not None:
                self.summary_fields["verification_at_start"] = self.evaluate()
            interrupted = self._loop()
            if not interrupted and self.verifier is not None:
                self._record_verification(self.evaluate())
            self._checkpoint()
        finally:
            self.stop.uninstall()
        return self._summary(time.perf_counter() - started, interrupted)

    def _loop(self) -> bool:
        """Steps until the end of the run; True when stopped by a signal."""
        if self.state.step >= self.plan.total_steps:
            return False
        timer = StepTimer()
        self.heartbeat.beat(self.state.step, "data")
        for micro_batches in self.step_batches():
            timer.data_ready()
            self.heartbeat.beat(self.state.step, "step")
            result = self.run_step(micro_batches)
            self._after_step(result, timer)
            if result.stop_requested:
                self.metrics.info(f"stop requested ({self.stop.signal_name or 'on another rank'}): "
                                  f"checkpointing at step {self.state.step} and exiting")
                return True
            if self.state.step >= self.plan.total_steps:
                return False
            if self._periodic():
                timer.restart()  # evaluation and checkpoint time is not step time
            self.heartbeat.beat(self.state.step, "data")
        return False

    # ---- layer 1: one step ------------------------------------------------------------------------
    def run_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """This step's learning rates from the schedule, then `StepRunner.step`."""
        lr = self.schedule.lr_at(self.state.step)
        backbone_lr = 0.0 if self.state.step < self.plan.freeze_backbone_steps else lr
        self.runner.head.set_step(self.state.step)  # the cluster terms' warm-up ramp (cluster.warmup_steps)
        result = self.runner.step(micro_batches, backbone_lr, lr * self.head_lr_factor,
                                  stop_requested=self.stop.requested, inject_nan=self.state.step + 1 in self.nan_steps)
        if self.loss_history is not None:
            self.loss_history.append(result.loss)
        return result

    def _after_step(self, result: StepResult, timer: StepTimer) -> None:
        step = self.state.step
        if result.nonfinite_microbatches:
            self.state.skipped_nonfinite += 1
            self.state.consecutive_nonfinite += 1
            self.metrics.info(f"step {step + 1}: non-finite loss in {result.nonfinite_microbatches} micro-batch(es), "
                              f"skipped ({self.state.skipped_nonfinite} so far)")
            if self.state.consecutive_nonfinite > self.plan.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.state.consecutive_nonfinite} consecutive steps with a non-finite loss (limit "
                    f"train.max_consecutive_nonfinite={self.plan.max_consecutive_nonfinite}); lower optim.lr or "
                    "check the data")
        else:
            self.state.consecutive_nonfinite = 0
        self.state.step += 1
        any_finite = result.nonfinite_microbatches < self.plan.gradient_accumulation_steps
        losses = {"loss": result.loss, **result.terms} if any_finite else {}
        scalars = self.stats_fn() if self.stats_fn is not None and self._is_logging_step(step) else None
        if self._is_logging_step(step):
            self._count_skipped_images()
        self.metrics.log_step(step, timer.step_done(), losses=losses, lr=self.schedule.lr_at(step), scalars=scalars)

    def _count_skipped_images(self) -> None:
        """Sum the loaders' skipped-image counts over the ranks (a collective: every rank calls it) and log growth."""
        count = torch.tensor([self.loader.skipped_images], dtype=torch.int64, device=self.runner.device)
        total = int(all_reduce_sum_(count, self.runner.group).item())
        if total > self.skipped_images:
            self.metrics.info(f"step {self.state.step}: {total - self.skipped_images} undecodable image(s) skipped "
                              f"since the last report, {total} in this run (data.on_bad_image=skip)")
        self.skipped_images = total

    def _is_logging_step(self, step: int) -> bool:
        return (step + 1) % self.metrics.every == 0 or step + 1 >= self.plan.total_steps

    def _periodic(self) -> bool:
        """Verification and checkpoints due after this step; True when something ran (time excluded)."""
        ran = False
        if self.verifier is not None and self.verifier.due(self.state.step):
            self._record_verification(self.evaluate())
            ran = True
        if self.plan.checkpoint_every > 0 and self.state.step % self.plan.checkpoint_every == 0:
            self._checkpoint()
            ran = True
        return ran

    def _checkpoint(self) -> None:
        self.heartbeat.beat(self.state.step, "checkpoint")
        if self.checkpointer is not None:
            self.checkpointer.save(self)

    # ---- verification -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Accuracy of every verification set for the model as it is now (`Verifier`; collective)."""
        self.heartbeat.beat(self.state.step, "evaluate")
        return self.verifier(self.runner.engine.module, engine_dtype(self.runner.engine))

    def _record_verification(self, accuracies: dict[str, float]) -> None:
        self.state.last_verification = dict(accuracies)
        for name, accuracy in accuracies.items():
            self.state.best_verification[name] = max(accuracy, self.state.best_verification.get(name, 0.0))
        scalars = {f"val/{name}": acc for name, acc in accuracies.items()}
        scalars.update({f"val/{name}_best": self.state.best_verification[name] for name in accuracies})
        self.metrics.log_scalars(self.state.step - 1, scalars)

    # ---- summary ----------------------------------------------------------------------------------
    def _summary(self, wall_seconds: float, interrupted: bool) -> dict[str, Any]:
        if interrupted:  # the last step was not a logging step
            self._count_skipped_images()
        last = self.metrics.last_logged
        terms = {key[len("loss/"):]: value for key, value in last.items() if key.startswith("loss/")}
        summary = {
            **self.summary_fields,
            "steps": self.state.step,
            "epochs": self.state.step / self.plan.steps_per_epoch,
            "images_per_sec": self.metrics.images_per_sec_mean(),
            "wall_seconds": wall_seconds,
            "final_loss": terms.pop("loss", math.nan),
            "final_loss_terms": terms,
            "verification": dict(self.state.last_verification),
            "verification_best": dict(self.state.best_verification),
            "skipped_nonfinite_steps": self.state.skipped_nonfinite,
            "skipped_images": self.skipped_images,
            "interrupted": interrupted,
        }
        if self.summary_path is not None and self.rank == 0:
            from largefr.train.metrics import write_summary

            write_summary(self.summary_path, summary)
        return summary

    # ---- checkpoint (largefr/stateful.py) ---------------------------------------------------------------
    def checkpoint_state(self) -> State:
        """The loop state and the data position (informational: a resume finds its batch from the step)."""
        return {Kind.REPLICATED: {"loop": asdict(self.state), "data_position": self.data_position()}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        saved = state[Kind.REPLICATED]["loop"]
        for entry in fields(LoopState):
            setattr(self.state, entry.name, copy.deepcopy(saved[entry.name]))

    @staticmethod
    def checkpoint_note(name: str) -> EntryNote | None:
        return {"loop": EntryNote("the loop state (steps done, skip counters, verification)", "every run"),
                "data_position": EntryNote("the position in the data", "every run")}.get(name)
