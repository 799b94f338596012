"""One optimizer step of the backbone engine and the external head: `StepRunner.step`, read top to bottom.

Kept free of config, data and logging so that tests drive it with real DeepSpeed engines and
compare with a dense reference; `largefr.train.trainer.Trainer` runs it in the training loop.

Non-finite losses are detected on all ranks together. A head whose loss is the same on every rank
(`loss_same_on_every_rank`, as `ClusterGuidedHead`'s: it is made from all-reduced values, so a NaN on one
rank reaches all) needs no collective for it: each rank reads its own loss (the one host sync a micro-batch
needs, since skipping happens before backward). Any other head's flag is all-reduced per micro-batch.
The "stop requested" flag of SIGTERM/SIGINT rides on the head step's one all-reduce
(`largefr.train.head_step.agree_head_flags`), so every rank stops after the same step.
Policy 'skip': with gradient accumulation 1 the whole step is skipped (no backward, no engine or
head step, no EMA update: weights and optimizer states stay as they were). With accumulation > 1
the bad micro-batch contributes a zero gradient (a backward of 0 x sum(parameters) keeps
DeepSpeed's accumulation bookkeeping and ZeRO's gradient hooks consistent) and the step applies
the others. Policy 'abort': every rank raises `NonFiniteLossError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_max_, group_size
from largefr.errors import UserError
from largefr.heads.joint import HeadLoss
from largefr.train.engine import engine_dtype, engine_loss_scale, overlapped_backbone
from largefr.train.phases import NULL_TIMER, PhaseTiming
from largefr.train.head_step import ExternalHeadStep, backbone_gradient_factor, scale_feature_gradient
from largefr.train.schedule import set_learning_rate


class NonFiniteLossError(UserError, RuntimeError):
    """A non-finite loss under train.on_nonfinite=abort (raised on every rank)."""


class StepHead(Protocol):
    """The head as the step drives it (`ClusterGuidedHead`; the tests' plain sharded ArcFace)."""

    def training_loss(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                      local_momentum_features: torch.Tensor | None) -> HeadLoss:
        """The loss (same on every rank), its terms and the local weight rows that get a gradient."""

    def undo_last_update(self) -> None:
        """Forget what the last `training_loss` changed besides gradients (a skipped batch leaves no trace)."""

    def set_step(self, step: int) -> None:
        """The optimizer step about to run, counted from 0 (the cluster terms' warm-up ramp follows it)."""


@dataclass(kw_only=True)
class StepResult:
    loss: torch.Tensor
    """Mean loss over the step's finite micro-batches (detached; nan if none was finite)."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: bool = False
    """Both optimizers stepped (False: skipped for a non-finite loss or an fp16 overflow)."""
    nonfinite_microbatches: int = 0
    skip_reason: str = ""
    stop_requested: bool = False
    """Some rank received SIGTERM/SIGINT before this step ended (identical on every rank)."""


class StepRunner:
    """Runs forward/backward of engine + head and the two optimizer steps, in the right order."""


    def __init__(self, *, engine, head: StepHead, head_step: ExternalHeadStep,
                 momentum_encoder: torch.nn.Module | None = None, encoder_momentum: float = 0.999,
                 group: ProcessGroup | None = None, on_nonfinite: str = "skip",
                 device: torch.device | str = "cpu", loss_same_on_every_rank: bool = False,
                 overlap_reduction: bool = True):
        """loss_same_on_every_rank: the head's loss is computed from all-reduced values (ClusterGuidedHead),
        so its finiteness needs no all-reduce of its own. overlap_reduction (train.overlap_reduction): at
        ZeRO 0 run the backbone under torch DDP's reducer (`overlapped_backbone`)."""
        self.phase_timer = NULL_TIMER
        """Times the step's phases: `set_phase_timer` (tools/profile_step.py, largefr/perf/profiling.py)."""
        self.engine = engine
        self.backbone = overlapped_backbone(engine) if overlap_reduction else engine
        self.loss_same_on_every_rank = loss_same_on_every_rank
        self.head = head
        self.head_step = head_step
        self.momentum_encoder = momentum_encoder
        self.encoder_momentum = encoder_momentum
        self.group = group
        self.on_nonfinite = on_nonfinite
        self.device = torch.device(device)
        self.gradient_accumulation_steps = engine.gradient_accumulation_steps()
        self.feature_grad_factor = backbone_gradient_factor(
            world_size=group_size(group), gradient_accumulation_steps=self.gradient_accumulation_steps)

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float, head_lr: float, *,
             stop_requested: bool = False, inject_nan: bool = False) -> StepResult:
        """`gradient_accumulation_steps` micro-batches of forward/backward, then the engine, head and EMA steps.
        inject_nan: FAULT INJECTION for tests (train.debug_inject_nan_steps): poison this rank's embeddings."""
        self._check_count(micro_batches)
        set_learning_rate(self.engine.optimizer, lr)
        self.head_step.set_learning_rate(head_lr)
        finite_losses: list[HeadLoss] = []
        nonfinite = 0
        for index, (images, labels) in enumerate(micro_batches):
            self._sync_gradients(index == len(micro_batches) - 1)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            momentum_features = self._momentum_forward(images)
            with self.phase_timer.phase("backbone_forward"):
                embeddings = self.backbone(images.to(engine_dtype(self.engine))).float()
            if inject_nan:  # before the head: its collectives carry the NaN to every rank, as a real one would
                embeddings = embeddings * float("nan")
            embeddings = scale_feature_gradient(embeddings, self.feature_grad_factor)
            head_loss = self.head.training_loss(embeddings, labels, momentum_features)
            loss = head_loss.loss
            if self._finite(loss):
                finite_losses.append(head_loss)
            else:  # the one place a non-finite micro-batch is handled
                nonfinite += 1
                self.head.undo_last_update()  # the queue and bank changed in forward
                if self.on_nonfinite == "abort":
                    raise NonFiniteLossError(nonfinite_message(loss, head_loss.terms))
                if self.gradient_accumulation_steps == 1:  # skip the whole step: nothing moves
                    self.head_step.zero_grad()
                    return summarize(finite_losses, nonfinite, applied=False, reason="non-finite loss",
                                     stop_requested=self._agree_stop(stop_requested))
                loss = self._zero_loss()  # contributes nothing, keeps DeepSpeed's accumulation bookkeeping
            with self.phase_timer.phase("backbone_backward"):
                self.engine.backward(loss, scale_wrt_gas=False)  # largefr applies 1/gas itself (head_step.py)
            loss_scale = engine_loss_scale(self.engine)  # before step(): the step may change it
            self._check_boundary(index, len(micro_batches))
            with self.phase_timer.phase("optimizer_engine"):
                self.engine.step()
        engine_applied = self.engine.was_step_applied()  # False after an fp16 overflow
        with self.phase_timer.phase("optimizer_head"):
            head = self.head_step.step(loss_scale=loss_scale, engine_step_applied=engine_applied,
                                       rows=union_rows([h.rows for h in finite_losses]),
                                       gathered=finite_losses[-1].gathered if finite_losses else None,
                                       stop_requested=stop_requested)
        if engine_applied and self.momentum_encoder is not None:  # EMA after every backbone update
            with self.phase_timer.phase("ema_update"):
                self.momentum_encoder.update(self.engine.module, self.encoder_momentum)
        return summarize(finite_losses, nonfinite, applied=engine_applied and head.applied,
                         reason="" if head.applied else head.reason, stop_requested=head.stop_requested)

    def set_phase_timer(self, timer: PhaseTiming | None) -> None:
        """Time the step's phases with `timer` (largefr/train/phases.py); None: untimed again."""
        self.phase_timer = NULL_TIMER if timer is None else timer

    def _check_count(self, micro_batches: Sequence) -> None:
        if len(micro_batches) != self.gradient_accumulation_steps:
            raise ValueError(f"StepRunner.step needs {self.gradient_accumulation_steps} micro-batches "
                             f"(gradient_accumulation_steps), got {len(micro_batches)}")

    def _momentum_forward(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.momentum_encoder is None:
            return None
        with self.phase_timer.phase("momentum_forward"):
            return self.momentum_encoder(images)

    def _sync_gradients(self, boundary: bool) -> None:
        """Under torch DDP's reducer, micro-batches before the accumulation boundary keep their gradients local
        (what `DistributedDataParallel.no_sync` sets, for the forward and backward that follow)."""
        if self.backbone is not self.engine:
            self.backbone.require_backward_grad_sync = boundary

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: one host read, plus an all-reduce unless the loss is the
        same on every rank anyway."""
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if not self.loss_same_on_every_rank:
            all_reduce_max_(flag, self.group)
        return not bool(flag.item())

    def _agree_stop(self, stop_requested: bool) -> bool:
        """Whether some rank asked to stop, on a skipped step (whose head step, which carries it, did not run)."""
        flag = torch.tensor([float(stop_requested)], device=self.device)
        return bool(all_reduce_max_(flag, self.group).item())

    def _zero_loss(self) -> torch.Tensor:
        """0 x sum(parameters): a backward that reaches every parameter (ZeRO's gradient hooks) with zeros."""
        return sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0

    def _check_boundary(self, index: int, count: int) -> None:
        if self.engine.is_gradient_accumulation_boundary() != (index == count - 1):
            raise RuntimeError("DeepSpeed's accumulation boundary is out of step with largefr's micro-batches")


def union_rows(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Sorted unique union of the micro-batches' rows (None when no micro-batch named any).

    With gradient accumulation each micro-batch samples its own rows (Partial FC); a row-sparse
    head optimizer steps the union.
    """
    given = [rows for rows in parts if rows is not None]
    if not given:
        return None
    return given[0] if len(given) == 1 else torch.unique(torch.cat(given))


def nonfinite_message(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> str:
    return (f"non-finite loss {loss.item()} (terms: { {k: float(v) for k, v in terms.items()} }); "
            "set train.on_nonfinite=skip to skip such steps")


def summarize(finite: list[HeadLoss], nonfinite: int, *, applied: bool, reason: str,
              stop_requested: bool) -> StepResult:
    """The step's mean loss and terms over its finite micro-batches (detached)."""
    loss = torch.stack([h.loss.detach() for h in finite]).mean() if finite else torch.tensor(float("nan"))
    terms = {key: torch.stack([h.terms[key].detach() for h in finite]).mean()
             for key in (finite[0].terms if finite else {})}
    return StepResult(loss=loss, terms=terms, applied=applied, nonfinite_microbatches=nonfinite,
                      skip_reason=reason, stop_requested=stop_requested)
