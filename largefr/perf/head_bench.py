"""Measuring the sharded margin head: step time, GEMM floor and peak head memory per rank.

Shared by `tools/bench_head.py` (one configuration, GEMM floor) and `tools/scale_classes.py`
(a grid of class counts and world sizes against the memory planner), so both measure the same way:

* step time: wall time of head forward + backward (all-gather, sampling, logits, margin, sharded
  cross entropy, backward into W and the embeddings), ranks started together by a barrier,
  gradients set to None first so each step allocates like a training step.
* peak head memory: bytes of the head's tensors alive before the step (W rows, local embeddings,
  labels) plus the peak the step allocates above what was allocated before it, during one extra
  forward + backward. CPU: the peak of the running sum of every allocation and free that torch's
  CPU memory profiler records. GPU: max_memory_allocated minus memory_allocated before the step
  (max_memory_allocated alone would count everything resident, e.g. the other head of --paired-default).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist

from largefr.config import HeadConfig
from largefr.distributed.spawn import run_ranks
from largefr.heads.sharded_head import ShardedMarginHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLOCKS = ("wall", "cpu")
"""What a step's time is measured with (HeadBenchSettings.clock)."""


@dataclass(kw_only=True)
class HeadBenchSettings:
    """One head configuration to measure on `world` spawned ranks."""

    batch: int
    """Per-rank batch B (global batch B_g = world * B)."""
    classes: int
    """Total number of classes K."""
    dim: int
    """Embedding size d."""
    world: int
    """Number of ranks to spawn (gloo on CPU, nccl with one GPU per rank when enough GPUs are present)."""
    sample_rate: float = 1.0
    """Partial FC sample rate in (0, 1]."""
    dtype: str = "float32"
    """Logits (GEMM) dtype, a key of DTYPES."""
    weight_dtype: str = "float32"
    """W's storage dtype (head.weight_dtype), a key of DTYPES."""
    chunk_size: int = 0
    """0: default head; > 0: low-memory head with this many classes per block."""
    repeats: int = 5
    """Timed steps (median reported)."""
    warmup: int = 2
    """Untimed steps first."""
    threads: int = 0
    """Torch threads per rank (0: cores / world)."""
    gemm_floor: bool = True
    """Also time the step's three GEMMs alone (bench_head's floor); off saves their buffers' time."""
    margin_type: str = "arcface"
    """Margin of the measured head (a head.type); any other than 'arcface' also builds an ArcFace head
    (same shapes, same data) and times its step right after this one in every repeat."""
    clock: str = "wall"
    """'wall': elapsed time; 'cpu': the rank process's CPU time (CPU only), which time slices given to other
    processes of a shared machine do not inflate (the ratio of two steps' work, not their latency)."""
    paired_default: bool = False
    """With chunk_size > 0: also build a default-mode head (same W, same data) and time its step in
    every repeat right after the low-memory one, so both modes see the same machine load."""

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock={self.clock!r}: must be one of {CLOCKS}")
        if self.threads == 0:
            self.threads = max(1, (os.cpu_count() or 1) // self.world)


def use_gpus(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of fn(), synchronising the GPU when there is one; clock 'cpu': this process's CPU time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    start = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (now() - start) * 1e3


class HeadBench:
    """One rank's head, inputs and the two things timed: a training step and its three GEMMs."""

    def __init__(self, settings: HeadBenchSettings, rank: int, device: torch.device):
        self.device = device
        self.head = ShardedMarginHead(settings.classes, settings.dim, margin=HeadConfig(type=settings.margin_type),
                                      sample_rate=settings.sample_rate, logits_dtype=DTYPES[settings.dtype],
                                      dtype=DTYPES[settings.weight_dtype],
                                      device=device, generator=torch.Generator().manual_seed(0),
                                      chunk_size=settings.chunk_size)
        data = torch.Generator().manual_seed(1 + rank)
        self.embeddings = torch.randn(settings.batch, settings.dim, generator=data).to(device).requires_grad_(True)
        self.labels = torch.randint(0, settings.classes, (settings.batch,), generator=data).to(device)
        self.loss: torch.Tensor | None = None
        self.step()  # fixes the sampled count S for the GEMM shapes
        if settings.gemm_floor:
            num_sampled, batch_global = len(self.head.last_sampled), settings.batch * settings.world
            dtype = DTYPES[settings.dtype]
            self.gemm_features = torch.randn(batch_global, settings.dim, device=device).to(dtype)
            self.gemm_weight = torch.randn(num_sampled, settings.dim, device=device).to(dtype)
            self.gemm_grad = torch.randn(batch_global, num_sampled, device=device).to(dtype)

    def step(self) -> None:
        self.clear_grads()
        self.forward_backward()

    def clear_grads(self) -> None:
        self.head.weight.grad = None
        self.embeddings.grad = None
        self.head.last_sampled = None  # else the profiler sees it freed without its allocation

    def forward_backward(self) -> None:
        loss = self.head(self.embeddings, self.labels)
        loss.backward()
        self.loss = loss.detach()

    def gemms(self) -> None:
        features, weight, grad = self.gemm_features, self.gemm_weight, self.gemm_grad
        logits = features @ weight.t()
        grad_features = grad @ weight
        grad_weight = grad.t() @ features
        del logits, grad_features, grad_weight

    def resident_bytes(self) -> int:
        """W, the inputs, and what the head keeps between steps (on a CPU its spare buffers, CurricularFace's
        derivative blocks)."""
        tensors = (self.head.weight, self.embeddings, self.labels, *self.head.held_tensors())
        return sum(t.numel() * t.element_size() for t in tensors)

    def peak_memory_mb(self) -> float:
        self.clear_grads()  # freed before measuring: the step then allocates its own gradients
        self.loss = None
        if self.device.type == "cuda":
            increment = cuda_peak_increment(self.forward_backward, self.device)
        else:
            increment = profiled_peak_increment(self.forward_backward)
        return (self.resident_bytes() + increment) / 2**20


def peak_increment(*, allocated_before: int, peak_allocated: int) -> int:
    """Bytes a step allocated at its peak above what was allocated before it (never negative).

    `peak_allocated` (max_memory_allocated after a reset) also counts every tensor already resident:
    the benchmark's GEMM buffers, the other head of --paired-default; only the rise belongs to the step.
    """
    return max(0, peak_allocated - allocated_before)


def cuda_peak_increment(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes fn() allocates on `device` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return peak_increment(allocated_before=before, peak_allocated=torch.cuda.max_memory_allocated(device))


def profiled_peak_increment(fn: Callable[[], None]) -> int:
    """Peak of the running sum of allocations minus frees during fn(), from torch's memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_rank(bench: HeadBench, settings: HeadBenchSettings, rank: int,
                 reference: HeadBench | None = None, label: str = "default") -> dict:
    """Warm-up, timed steps (and GEMMs, and the reference head's steps), then the peak memory of one more step."""
    for _ in range(settings.warmup):
        bench.step()
        if settings.gemm_floor:
            bench.gemms()
        if reference is not None:
            reference.step()
    step_ms, gemm_ms, reference_ms = [], [], []
    for _ in range(settings.repeats):
        dist.barrier()
        step_ms.append(timed(bench.step, bench.device, settings.clock))
        if settings.gemm_floor:
            dist.barrier()
            gemm_ms.append(timed(bench.gemms, bench.device, settings.clock))
        if reference is not None:
            dist.barrier()
            reference_ms.append(timed(reference.step, reference.device, settings.clock))
    dist.barrier()
    result = {}
    if reference is not None:  # measured and dropped first: its tensors must not sit in this head's peak
        result.update({f"{label}_step_ms": statistics.median(reference_ms), f"{label}_step_ms_all": reference_ms,
                       f"{label}_peak_mem_mb": reference.peak_memory_mb(), f"{label}_loss": float(reference.loss),
                       f"step_ratio_to_{label}": [a / b for a, b in zip(step_ms, reference_ms, strict=True)]})
        del reference
    result.update(rank=rank, step_ms=statistics.median(step_ms), peak_mem_mb=bench.peak_memory_mb(),
                  num_local=bench.head.partition.num_local, num_sampled=len(bench.head.last_sampled),
                  step_ms_all=step_ms, loss=float(bench.loss))
    if settings.gemm_floor:
        result.update(gemm_ms=statistics.median(gemm_ms), gemm_ms_all=gemm_ms)
        result["gemm_floor_ratio"] = result["step_ms"] / result["gemm_ms"]
    return result


def _measure_on_rank(rank: int, world: int, settings: HeadBenchSettings) -> dict:
    device = torch.device(f"cuda:{rank}") if use_gpus(settings.world) else torch.device("cpu")
    bench = HeadBench(settings, rank, device)
    paired = settings.paired_default and settings.chunk_size > 0
    # built inline so that measure_rank holds the only reference and can free it
    if settings.margin_type != "arcface":
        return measure_rank(bench, settings, rank, HeadBench(replace(settings, margin_type="arcface",
                                                                     gemm_floor=False), rank, device), "arcface")
    return measure_rank(bench, settings, rank,
                        HeadBench(replace(settings, chunk_size=0, gemm_floor=False), rank, device) if paired else None)


def run_head_bench(settings: HeadBenchSettings) -> list[dict]:
    """Spawn `settings.world` ranks, measure, and return each rank's result dict (rank order)."""
    return run_ranks(_measure_on_rank, settings.world, settings, threads=settings.threads,
                     backend="nccl" if use_gpus(settings.world) else "gloo")


def machine_description(world: int) -> str:
    if use_gpus(world):
        return f"{world} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()}-core CPU ({cpu_model()}), no GPU"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
