"""Per-phase step timing for `tools/profile_step.py`: `PhaseTimer` and `profile_steps`.

`PhaseTimer` implements the step's phase-timer contract (`largefr.train.phases.PhaseTiming`; the
step holds the no-op `NULL_TIMER` unless profiled). It synchronises the device at every phase
boundary (so GPU work is charged to the phase that launched it) and keeps *exclusive* time: while a
nested phase runs, its parent's clock is paused, so the phases of a step add up to the step.

Backward passes cannot be wrapped in `with` blocks from the outside; `mark_backward` puts an
identity autograd node on a tensor whose backward calls `switch()`: from then on the running phase
is charged to that loss (or the gather, or the backbone). The head marks each loss's output and the
feature gather. Autograd runs the most recently created nodes first, so the losses' backward
sub-graphs run one after the other (L_ali, L_con, L_cg), then the gather's reduce-scatter, then the
backbone; the split is exact up to the few element-wise nodes that join the terms.

`profile_steps(trainer, timer, ...)` runs real steps of a built `Trainer` through the trainer's own
data iterator (`Trainer.step_batches`) and `Trainer.run_step`, timing the data wait as a phase. It
hands the timer to the step and to the head through their declared hooks (`StepRunner.set_phase_timer`,
the head's `set_phase_timer`) and changes no module's attributes.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

from largefr.config import Config, load_config
from largefr.models import model_flops
from largefr.train.trainer import Trainer


class PhaseTimer:
    """Exclusive wall time per named phase, device-synchronised at every boundary."""

    enabled = True

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._last = 0.0
        self._cpu_at_reset = time.process_time()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _charge(self) -> None:
        """Charge the time since the last boundary to the running (innermost) phase."""
        now = self._now()
        if self._stack:
            top = self._stack[-1]
            self.totals[top] = self.totals.get(top, 0.0) + now - self._last
        self._last = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge()
        self._stack.append(name)
        depth = len(self._stack)
        try:
            yield
        finally:
            self._charge()
            del self._stack[depth - 1:]  # a switch() inside relabels the top; drop it whatever its name

    def switch(self, name: str) -> None:
        """From now on the innermost running phase is charged as `name` (used from backward hooks)."""
        if not self._stack:
            return
        self._charge()
        self._stack[-1] = name

    def mark_backward(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """`tensor` unchanged; when backward reaches it, this timer switches to phase `name`."""
        return mark_backward(tensor, self, name)

    def reset(self) -> None:
        self.totals = {}
        self._cpu_at_reset = time.process_time()

    def cpu_seconds(self) -> float:
        """CPU time of this process (every thread, user and system) since the last reset: unlike wall time, what
        other processes on a busy machine take is not in it; waits for other ranks are not either."""
        return time.process_time() - self._cpu_at_reset

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


class _SwitchOnBackward(torch.autograd.Function):
    """Identity; its backward switches the timer to a phase (the gradient passes unchanged)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, timer: PhaseTimer, name: str) -> torch.Tensor:
        ctx.timer, ctx.name = timer, name
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.timer.switch(ctx.name)
        return grad, None, None


def mark_backward(tensor: torch.Tensor, timer: PhaseTimer, name: str) -> torch.Tensor:
    """`tensor` unchanged; when backward reaches it, the timer switches to phase `name`."""
    if not tensor.requires_grad:
        return tensor
    return _SwitchOnBackward.apply(tensor, timer, name)


@contextlib.contextmanager
def timed_head(head: torch.nn.Module, timer: PhaseTimer) -> Iterator[None]:
    """The head's parts charged to phases while the context is open, through the head's own hook.

    Phases: 'head_other' (queue/bank update, sampling, joining the terms), 'feature_gather',
    'loss_cg' (margin head), 'loss_con' (L_con, or the Center / triplet loss that
    cluster.contrastive_type puts in its place), 'loss_ali' (forward and backward each). The head
    takes the timer with `set_phase_timer(timer)` and forgets it with `set_phase_timer(None)`.
    """
    head.set_phase_timer(timer)
    try:
        yield
    finally:
        head.set_phase_timer(None)


# ---- the profiled loop ----------------------------------------------------------------------------
def profile_steps(trainer: Trainer, timer: PhaseTimer, *, steps: int, warmup: int, trace_dir: str | None = None) -> float:
    """`warmup` untimed steps, then `steps` timed ones of `trainer`; their wall time (data wait included).

    Periodic work (logging, verification, checkpoints) is the loop's, not the step's, and is left out.
    `trace_dir`: a torch.profiler trace of the timed steps, `trace_rank<rank>.json`.
    """
    source = trainer.step_batches()
    trainer.runner.set_phase_timer(timer)
    try:
        with timed_head(trainer.runner.head, timer):
            for _ in range(warmup):
                _profiled_step(trainer, timer, source)
            _synchronize(trainer.runner.device)
            timer.reset()
            with _trace(trace_dir, trainer.rank):
                started = time.perf_counter()
                for _ in range(steps):
                    _profiled_step(trainer, timer, source)
                _synchronize(trainer.runner.device)
                return time.perf_counter() - started
    finally:
        trainer.runner.set_phase_timer(None)
        source.close()


def _profiled_step(trainer: Trainer, timer: PhaseTimer, source: Iterator[list]) -> None:
    with timer.phase("data_wait"):
        micro_batches = next(source)
    with timer.phase("other"):  # whatever the step does outside a named phase
        trainer.run_step(micro_batches)
    trainer.state.step = (trainer.state.step + 1) % max(trainer.plan.total_steps, 1)  # stay inside the schedule


@contextlib.contextmanager
def _trace(trace_dir: str | None, rank: int) -> Iterator[None]:
    if trace_dir is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as profiler:
        yield
    os.makedirs(trace_dir, exist_ok=True)
    profiler.export_chrome_trace(os.path.join(trace_dir, f"trace_rank{rank}.json"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- model FLOPs utilisation ---------------------------------------------------------------------
# Peak dense (no 2:4 sparsity) tensor-core rates in TFLOP/s, and plain FP32 (CUDA cores; TF32 off).
# Sources: NVIDIA datasheets -- H100 Tensor Core GPU datasheet (SXM5: BF16/FP16 989.4, FP32 66.9;
# PCIe: 756.5 / 51.2; the sheet prints 2x "with sparsity"), H200 Tensor Core GPU datasheet (SXM:
# BF16/FP16 989, FP32 67), A100 Tensor Core GPU datasheet (SXM4/PCIe: BF16/FP16 312, FP32 19.5),
# V100 datasheet (SXM2: FP16 tensor 125, FP32 15.7; no BF16 hardware). The NVL cards (H100 NVL, H200 NVL
# datasheets: BF16/FP16 1,671 "with sparsity", so 835.5 dense; FP32 60) are slower than the SXM parts whose
# short names their device names also contain, so every more specific key comes before its short one.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},  # SXM5
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak dense rate of a known GPU for 'bf16' | 'fp16' | 'fp32'; None when unknown."""
    name = device_name.upper()
    for key, rates in PEAK_TFLOPS.items():  # 'H100 NVL' and 'H100 PCIe' before 'H100'
        if all(part.upper() in name for part in key.split()):
            return rates.get(precision)
    return None


def step_flops(*, backbone_forward_flops: int, local_batch: int, momentum_encoder: bool,
               global_batch: int, embedding_size: int, sampled_classes: int,
               gradient_accumulation_steps: int = 1) -> int:
    """Model FLOPs of one optimizer step on one rank.

    local_batch: images this rank runs through the backbone per step (all micro-batches).
    global_batch: rows B_g the head gathers per micro-batch; the head runs once per micro-batch,
    `gradient_accumulation_steps` times a step.
    Backbone forward + backward = 3x forward; the momentum encoder adds one forward; the head's
    three GEMMs (logits, dL/dfeatures, dL/dW) are 2*B_g*d*S each over the rank's S sampled classes.
    Cluster terms and element-wise work are left out (small next to these).
    """
    backbone = (3 + (1 if momentum_encoder else 0)) * backbone_forward_flops * local_batch
    head = 3 * 2 * global_batch * embedding_size * sampled_classes * gradient_accumulation_steps
    return int(backbone + head)


def config_step_flops(config: Config, *, world_size: int, momentum_encoder: bool, sampled_classes: int) -> int:
    """Model FLOPs of one optimizer step per rank of a config: every micro-batch of the backbone and of the head."""
    gas = config.train.gradient_accumulation_steps
    return step_flops(backbone_forward_flops=model_flops(config.model.network, config.data.image_size,
                                                         embedding_size=config.model.embedding_size),
                      local_batch=config.train.batch_size * gas, momentum_encoder=momentum_encoder,
                      global_batch=config.train.batch_size * world_size, embedding_size=config.model.embedding_size,
                      sampled_classes=sampled_classes, gradient_accumulation_steps=gas)


def load_profile_config(path: str, overrides: list[str], world_size: int) -> Config:
    """The training config of a profiled run: output moved to <output>/profile, periodic work off
    (tools/profile_step.py, tools/gpu_throughput.py)."""
    config = load_config(path, overrides, world_size=world_size)
    extra = [f"output={os.path.join(str(config.output), 'profile')}", "eval.every=0", "checkpoint.every=0"]
    return load_config(path, [*overrides, *extra], world_size=world_size)
