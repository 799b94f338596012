"""Learning-rate schedules as pure functions of the optimizer step (resume needs no scheduler state).

Steps are counted from 0: `lr_at(step)` is the learning rate used by the optimizer update number
`step` (the first update is step 0). A run of `total_steps` updates uses steps 0 .. total_steps-1.

Two schedules:

- ``"step"`` (the paper's): ``base_lr * gamma ** (number of milestones <= step)`` after an optional
  linear warmup; e.g. Adam 1e-3, x0.1 at epochs 20/40/60, 80 epochs.
- ``"poly"`` (insightface's arcface_torch): linear warmup, then
  ``base_lr * (1 - (step - warmup) / (total - warmup)) ** power``, reaching 0 at ``total_steps``.
  insightface's older ``PolyScheduler`` used power 2; its current ``PolynomialLRWarmup`` defaults
  to power 1 (linear decay). Both are ``power`` here.

Warmup (both schedules) is linear: ``base_lr * (step + 1) / warmup`` for ``step < warmup``, so the
first update already moves (insightface's scheduler spends its first update at lr 0) and update
``warmup - 1`` uses ``base_lr``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from largefr.choices import SCHEDULE_TYPES, SCHEDULE_UNITS, ScheduleType, ScheduleUnit
from largefr.errors import UserError


class ScheduleError(UserError, ValueError):
    """The schedule settings (section `schedule`) or the data set's size give no valid schedule."""



def steps_per_epoch(num_images: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `num_images` images at `global_batch` images per step.

    `num_images // global_batch`: the last partial batch is dropped, as insightface counts it
    (`num_image // total_batch_size`). `global_batch` = per-rank batch x world size x gradient
    accumulation steps.
    """
    if global_batch < 1:
        raise ScheduleError(f"global batch must be >= 1, got {global_batch}")
    steps = num_images // global_batch
    if steps < 1:
        raise ScheduleError(
            f"data set of {num_images} images is smaller than one global batch of {global_batch} images "
            "(train.batch_size x world size x train.gradient_accumulation_steps): use a smaller batch or fewer ranks"
        )
    return steps


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """A learning-rate schedule over `total_steps` optimizer steps, all lengths already in steps."""

    type: ScheduleType
    """'step' or 'poly' (see the module docstring)."""
    base_lr: float
    """Peak learning rate (after warmup)."""
    total_steps: int
    """Optimizer steps of the whole schedule (epochs x steps per epoch)."""
    warmup_steps: int = 0
    """Linear warmup length in steps."""
    milestone_steps: tuple[int, ...] = field(default_factory=tuple)
    """'step' schedule: steps at which the lr is multiplied by `gamma` (increasing)."""
    gamma: float = 0.1
    """'step' schedule: decay factor per milestone."""
    power: float = 2.0
    """'poly' schedule: exponent of the decay."""

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer update number `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.type == "step":
            return self.base_lr * self.gamma ** bisect.bisect_right(self.milestone_steps, step)
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps
        return self.base_lr * (1.0 - progress) ** self.power


def _to_steps(value: float, unit: ScheduleUnit, per_epoch: int, name: str) -> int:
    if unit == "epoch":
        return int(round(value * per_epoch))
    if value != int(value):
        raise ScheduleError(f"{name} is in steps (unit 'step') and must be a whole number, got {value}")
    return int(value)


def _either(choices: Sequence[str]) -> str:
    return " or ".join(repr(choice) for choice in choices)


def build_lr_schedule(*, type: ScheduleType, unit: ScheduleUnit, base_lr: float, epochs: float,
                      steps_per_epoch: int, warmup: float = 0, milestones: Sequence[float] = (),
                      gamma: float = 0.1, power: float = 2.0) -> LRSchedule:
    """Build a schedule; `warmup` and `milestones` are in `unit`, `epochs` is always in epochs.

    The schedule lasts `round(epochs * steps_per_epoch)` steps (a `train.max_steps` stop does not
    change it: the lr curve is the full run's).
    """
    if type not in SCHEDULE_TYPES:
        raise ScheduleError(f"schedule type must be {_either(SCHEDULE_TYPES)}, got {type!r}")
    if unit not in SCHEDULE_UNITS:
        raise ScheduleError(f"schedule unit must be {_either(SCHEDULE_UNITS)}, got {unit!r}")
    if steps_per_epoch < 1:
        raise ScheduleError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if not (base_lr > 0 and math.isfinite(base_lr)):
        raise ScheduleError(f"base_lr must be a positive number, got {base_lr}")
    total = int(round(epochs * steps_per_epoch))
    if total < 1:
        raise ScheduleError(f"epochs ({epochs}) x steps_per_epoch ({steps_per_epoch}) gives no step to train")
    warmup_steps = _to_steps(warmup, unit, steps_per_epoch, "warmup")
    milestone_steps = tuple(_to_steps(m, unit, steps_per_epoch, "milestones") for m in milestones)
    _check(type, total, warmup_steps, milestone_steps, gamma, power)
    return LRSchedule(type=type, base_lr=base_lr, total_steps=total, warmup_steps=warmup_steps,
                      milestone_steps=milestone_steps, gamma=gamma, power=power)


def _check(type: ScheduleType, total: int, warmup_steps: int, milestone_steps: tuple[int, ...],
           gamma: float, power: float) -> None:
    if not 0 <= warmup_steps < total:
        raise ScheduleError(f"warmup ({warmup_steps} steps) must be >= 0 and shorter than the schedule ({total} steps)")
    if type == "poly" and not power > 0:
        raise ScheduleError(f"power must be > 0, got {power}")
    if type == "step":
        if not 0 < gamma <= 1:
            raise ScheduleError(f"gamma must be in (0, 1], got {gamma}")
        if list(milestone_steps) != sorted(set(milestone_steps)):
            raise ScheduleError(f"milestones must be strictly increasing, got steps {list(milestone_steps)}")
        late = [m for m in milestone_steps if not 0 < m < total]
        if late:
            raise ScheduleError(f"milestones at steps {late} would never apply: they must lie in (0, {total})")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every parameter group (the schedule is applied by the trainer before each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
