"""Training metrics: per-step timing, a progress line, TensorBoard scalars and the run summary.

Only rank 0 writes. Loss values may be passed as tensors: they are accumulated on their device and
converted with `.item()` only on logging steps, so non-logging steps never synchronise the GPU.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from largefr.checkpoint.storage import StorageError, describe_write_failure

Number = float | int | torch.Tensor


@dataclass(frozen=True, kw_only=True)
class StepTiming:
    """Wall time of one step split into waiting for data and everything else."""

    data_seconds: float
    compute_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.data_seconds + self.compute_seconds


class StepTimer:
    """Measures data wait vs compute per step with `time.perf_counter`.

    Call `data_ready()` when the batch is in hand and `step_done()` when the step has finished; a
    step starts where the previous one ended (or at construction / `restart()`). On a GPU the host
    runs ahead of the device, so one step's split is approximate, but the sums over a logging
    window are right: the host cannot run ahead by more than the queue depth, and logging syncs.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start timing from now (e.g. after evaluation or checkpointing, which are not steps)."""
        self._step_start = time.perf_counter()
        self._data_ready: float | None = None

    def data_ready(self) -> None:
        self._data_ready = time.perf_counter()

    def step_done(self) -> StepTiming:
        now = time.perf_counter()
        ready = self._data_ready if self._data_ready is not None else self._step_start
        timing = StepTiming(data_seconds=ready - self._step_start, compute_seconds=now - ready)
        self._step_start, self._data_ready = now, None
        return timing


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak allocated accelerator memory on `device`, or the process's peak resident memory on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _to_float(value: Number) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class MetricsLogger:
    """Progress line every `every` steps, TensorBoard scalars, `<output_dir>/train.log`; rank 0 writes.

    `global_batch` (images per optimizer step over all ranks) gives images/s. The mean images/s of
    the run (`images_per_sec_mean`) leaves out the first `warmup_steps` steps (compilation, cache
    filling, DALI start-up). Steps are counted as the trainer counts them; `log_step` is called once
    per optimizer step with the 0-based step index just completed.
    """

    def __init__(self, output_dir: str, *, rank: int, every: int, total_steps: int, global_batch: int,
                 warmup_steps: int = 5, start_step: int = 0, tensorboard: bool = True, log_file: bool = True,
                 device: torch.device | str | None = None) -> None:
        if every < 1:
            raise ValueError(f"logging.every must be >= 1, got {every}")
        self.rank, self.every, self.total_steps, self.global_batch = rank, every, total_steps, global_batch
        self.warmup_steps, self.device = warmup_steps, device
        self.last_logged: dict[str, float] = {}
        self._loss_sums: dict[str, torch.Tensor | float] = {}
        self._loss_counts: dict[str, int] = {}
        self._window_steps, self._window_data, self._window_total = 0, 0.0, 0.0
        self._steady_steps, self._steady_seconds = 0, 0.0
        self._log, self._writer = None, None
        if rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            if log_file:
                self._log = open(os.path.join(output_dir, "train.log"), "a", encoding="utf-8")
            if tensorboard:
                self._writer = self._open_tensorboard(os.path.join(output_dir, "tensorboard"), start_step)

    @staticmethod
    def _open_tensorboard(log_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops points a previous (interrupted) run wrote after the step we resume from
        return SummaryWriter(log_dir=log_dir, purge_step=start_step if start_step > 0 else None)

    def info(self, message: str) -> None:
        """Write one timestamped line to stdout and the log file (rank 0 only)."""
        if self.rank != 0:
            return
        line = f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}"
        print(line, file=sys.stdout, flush=True)
        if self._log is not None:
            self._write_log(line + "\n")

    def _write_log(self, text: str) -> None:
        """Append to train.log; a full disk or an I/O error stops the run naming the file and the free space."""
        try:
            self._log.write(text)
            self._log.flush()
        except OSError as error:
            raise StorageError(describe_write_failure(error, self._log.name, "train.log")) from error

    def log_step(self, step: int, timing: StepTiming, *, losses: Mapping[str, Number], lr: float,
                 scalars: Mapping[str, Number] | None = None) -> dict[str, float] | None:
        """Account one finished step; on logging steps write the line and scalars and return them.

        `losses`: each loss term (tensors welcome); the line shows their mean over the window.
        `scalars`: extra values for TensorBoard only (cluster statistics, ...), logged as given.
        """
        self._accumulate(step, timing, losses)
        is_last = step + 1 >= self.total_steps
        if (step + 1) % self.every != 0 and not is_last:
            return None
        values = self._window_values(step, lr)
        if self.rank == 0:
            self.info(self._format_line(step, values))
            extra = {name: _to_float(v) for name, v in (scalars or {}).items()}
            self._write_scalars(step, values, extra)
        self.last_logged = values
        self._reset_window()
        return values

    def _accumulate(self, step: int, timing: StepTiming, losses: Mapping[str, Number]) -> None:
        self._window_steps += 1
        self._window_data += timing.data_seconds
        self._window_total += timing.total_seconds
        if step >= self.warmup_steps:
            self._steady_steps += 1
            self._steady_seconds += timing.total_seconds
        if self.rank != 0:
            return
        for name, value in losses.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value
            self._loss_counts[name] = self._loss_counts.get(name, 0) + 1

    def _window_values(self, step: int, lr: float) -> dict[str, float]:
        steps, total = self._window_steps, self._window_total
        step_time = total / steps if steps else float("nan")
        sums = self._loss_sums_as_floats()
        values = {f"loss/{name}": total / self._loss_counts[name] for name, total in sums.items()}
        values.update({
            "lr": float(lr),
            "perf/images_per_sec": self.global_batch * steps / total if total > 0 else float("nan"),
            "perf/data_wait_pct": 100.0 * self._window_data / total if total > 0 else float("nan"),
            "perf/step_seconds": step_time,
            "perf/eta_seconds": max(self.total_steps - step - 1, 0) * step_time,
            "memory/peak_gib": peak_memory_bytes(self.device) / 2**30,
        })
        return values

    def _loss_sums_as_floats(self) -> dict[str, float]:
        """One device-to-host copy for all tensor-valued sums instead of one `.item()` per term."""
        tensor_names = [n for n, v in self._loss_sums.items() if isinstance(v, torch.Tensor)]
        floats = {n: float(v) for n, v in self._loss_sums.items() if n not in tensor_names}
        if tensor_names:
            stacked = torch.stack([self._loss_sums[n].float().reshape(()) for n in tensor_names])
            floats.update(zip(tensor_names, stacked.cpu().tolist()))
        return {n: floats[n] for n in self._loss_sums}

    def _format_line(self, step: int, values: Mapping[str, float]) -> str:
        losses = " ".join(f"{k[len('loss/'):]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
        return (f"step {step + 1}/{self.total_steps} | {values['perf/images_per_sec']:.1f} img/s | {losses} | "
                f"lr {values['lr']:.3e} | data {values['perf/data_wait_pct']:.1f}% | "
                f"eta {_format_eta(values['perf/eta_seconds'])} | mem {values['memory/peak_gib']:.2f} GiB")

    def _write_scalars(self, step: int, values: Mapping[str, float], extra: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in {**values, **extra}.items():
            self._writer.add_scalar(tag, value, global_step=step + 1)
        self._writer.flush()

    def _reset_window(self) -> None:
        self._loss_sums, self._loss_counts = {}, {}
        self._window_steps, self._window_data, self._window_total = 0, 0.0, 0.0

    def log_scalars(self, step: int, scalars: Mapping[str, Number], *, line: bool = True) -> None:
        """Write scalars outside the step cadence (verification accuracy, ...); step is 0-based."""
        if self.rank != 0:
            return
        values = {name: _to_float(v) for name, v in scalars.items()}
        if line:
            self.info(f"step {step + 1}: " + " ".join(f"{k} {v:.5f}" for k, v in values.items()))
        self._write_scalars(step, values, {})

    def images_per_sec_mean(self) -> float:
        """Mean images/s over all steps after the first `warmup_steps` (nan if none)."""
        if self._steady_seconds <= 0:
            return float("nan")
        return self.global_batch * self._steady_steps / self._steady_seconds

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log is not None:
            log, self._log = self._log, None
            try:
                log.close()
            except OSError:  # what a full disk left in the buffer; the failed write was already reported
                pass


def _json_ready(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(path: str, summary: Mapping[str, Any]) -> None:
    """Write `summary` as JSON atomically: a reader sees the old file or the new one, never half."""
    text = json.dumps(_json_ready(summary), indent=2, sort_keys=True, allow_nan=False)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        raise StorageError(describe_write_failure(error, path, os.path.basename(path))) from error
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
