"""One optimizer step of the backbone engine and the external head: `train_step -> forward_backward`.

Kept free of config, data and logging so that tests drive it with real DeepSpeed engines and
compare with a dense reference; `largefr.train.trainer.Trainer` runs it in the training loop.

Non-finite losses are detected on all ranks together (one all-reduce per micro-batch, which also
carries the "stop requested" flag of SIGTERM/SIGINT so every rank stops after the same step).
Policy 'skip': with gradient accumulation 1 the whole step is skipped (no backward, no engine or
head step, no EMA update: weights and optimizer states stay as they were). With accumulation > 1
the bad micro-batch contributes a zero gradient (a backward of 0 x sum(parameters) keeps
DeepSpeed's accumulation bookkeeping and ZeRO's gradient hooks consistent) and the step applies
the others. Policy 'abort': every rank raises `NonFiniteLossError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_max_, group_size
from largefr.train.engine import engine_dtype, engine_loss_scale
from largefr.train.head_step import ExternalHeadStep, backbone_gradient_factor, scale_feature_gradient
from largefr.train.profiling import NULL_TIMER
from largefr.train.schedule import set_learning_rate

HeadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]


class NonFiniteLossError(RuntimeError):
    """A non-finite loss under train.on_nonfinite=abort (raised on every rank)."""


@dataclass(kw_only=True)
class MicroBatchResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    finite: bool
    stop_requested: bool


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

    phase_timer = NULL_TIMER  # tools/profile.py sets a PhaseTimer (largefr/train/profiling.py)
    inject_nan = False  # FAULT INJECTION for tests (train.debug_inject_nan_steps): poison this rank's loss

    def __init__(self, *, engine, head: HeadFn, head_step: ExternalHeadStep,
                 momentum_encoder: torch.nn.Module | None = None, encoder_momentum: float = 0.999,
                 group: ProcessGroup | None = None, on_nonfinite: str = "skip",
                 device: torch.device | str = "cpu"):
        self.engine = engine
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

    # ---- layer 2: one micro-batch --------------------------------------------------------
    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, *,
                         stop_requested: bool = False, backward_if_nonfinite: bool = True) -> MicroBatchResult:
        """Forward both encoders and the head, agree on finiteness, then backward through the engine."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        momentum_features = None
        if self.momentum_encoder is not None:
            with self.phase_timer.phase("momentum_forward"):
                momentum_features = self.momentum_encoder(images)
        with self.phase_timer.phase("backbone_forward"):
            embeddings = self.engine(images.to(engine_dtype(self.engine))).float()
        embeddings = scale_feature_gradient(embeddings, self.feature_grad_factor)
        loss, terms = self.head(embeddings, labels, momentum_features)
        if self.inject_nan:
            loss = loss * float("nan")
        finite, stop_everywhere = self._agree(loss, stop_requested)
        if not finite and hasattr(self.head, "undo_last_update"):
            self.head.undo_last_update()  # the queue and bank changed in forward: a skipped batch leaves no trace
        if finite:
            if self.head_step.touched_rows is not None:  # rows a row-sparse head optimizer must step
                self.head_step.touched_rows.add(getattr(self.head, "last_touched_rows", None))
            # scale_wrt_gas=False: largefr applies 1/gas itself (see head_step.py)
            with self.phase_timer.phase("backbone_backward"):
                self.engine.backward(loss, scale_wrt_gas=False)
        elif self.on_nonfinite == "abort":
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} (terms: { {k: float(v) for k, v in terms.items()} }); "
                "set train.on_nonfinite=skip to skip such steps")
        elif backward_if_nonfinite:
            self.engine.backward(self._zero_loss(), scale_wrt_gas=False)
        return MicroBatchResult(loss=loss.detach(), terms={k: v.detach() for k, v in terms.items()},
                                finite=finite, stop_requested=stop_everywhere)

    def _agree(self, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
        """(finite on every rank, stop requested on some rank): built on the device, read once (one host sync)."""
        flags = torch.zeros(2, dtype=torch.float32, device=loss.device)
        flags[0] = (~torch.isfinite(loss.detach())).any()
        flags[1] = float(stop_requested)
        all_reduce_max_(flags, self.group)
        nonfinite, stop = flags.tolist()
        return nonfinite == 0, stop > 0

    def _zero_loss(self) -> torch.Tensor:
        return sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0

    # ---- layer 1: one optimizer step -----------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, lr: float,
                   head_lr: float, stop_requested: bool = False) -> StepResult:
        """`gradient_accumulation_steps` micro-batches, then the engine step and the head step."""
        if len(micro_batches) != self.gradient_accumulation_steps:
            raise ValueError(f"train_step needs {self.gradient_accumulation_steps} micro-batches "
                             f"(gradient_accumulation_steps), got {len(micro_batches)}")
        set_learning_rate(self.engine.optimizer, lr)
        self.head_step.set_learning_rate(head_lr)
        results = []
        for index, (images, labels) in enumerate(micro_batches):
            single = self.gradient_accumulation_steps == 1
            result = self.forward_backward(images, labels, stop_requested=stop_requested,
                                           backward_if_nonfinite=not single)
            results.append(result)
            if single and not result.finite:
                self.head_step.zero_grad()
                return self._summarize(results, applied=False, reason="non-finite loss")
            loss_scale = engine_loss_scale(self.engine)  # before step(): the step may change it
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary != (index == len(micro_batches) - 1):
                raise RuntimeError("DeepSpeed's accumulation boundary is out of step with largefr's micro-batches")
            with self.phase_timer.phase("optimizer_engine"):
                self.engine.step()
        engine_applied = self.engine.was_step_applied()  # False after an fp16 overflow
        with self.phase_timer.phase("optimizer_head"):
            head = self.head_step.step(loss_scale=loss_scale, engine_step_applied=engine_applied)
        if engine_applied and self.momentum_encoder is not None:  # EMA after every backbone update
            with self.phase_timer.phase("ema_update"):
                self.momentum_encoder.update(self.engine.module, self.encoder_momentum)
        return self._summarize(results, applied=engine_applied and head.applied,
                               reason="" if head.applied else head.reason)

    @staticmethod
    def _summarize(results: list[MicroBatchResult], *, applied: bool, reason: str) -> StepResult:
        finite = [r for r in results if r.finite]
        loss = torch.stack([r.loss for r in finite]).mean() if finite else torch.tensor(float("nan"))
        terms = {key: torch.stack([r.terms[key] for r in finite]).mean() for key in (finite[0].terms if finite else {})}
        return StepResult(loss=loss, terms=terms, applied=applied,
                          nonfinite_microbatches=len(results) - len(finite), skip_reason=reason,
                          stop_requested=any(r.stop_requested for r in results))
