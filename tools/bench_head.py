"""Benchmark the sharded margin head: forward+backward time against the floor of its three GEMMs.

    python tools/bench_head.py --batch 256 --classes 200000 --dim 512 --world 2

Spawns `--world` ranks (gloo on CPU, or nccl with one GPU per rank when enough GPUs are present).
`--batch` is the per-rank batch B (global batch B_g = world * B). Per rank it reports:

* step_ms: median wall time of head forward + backward (all-gather, sampling, logits, margin,
  sharded cross entropy, backward into W and the embeddings), after `--warmup` steps.
* gemm_ms: median time of the same-shaped matrix products alone, timed in the same run between
  the steps: logits = F(B_g x d) @ W(S x d)^T, dF = G(B_g x S) @ W, dW = G^T @ F, in the logits
  dtype, each writing a fresh output like the step does.
* gemm_floor_ratio = step_ms / gemm_ms.
* peak_mem_mb: head tensors only. CPU: bytes of the tensors alive before the step (W rows, local
  embeddings, labels) plus the peak of the running sum of every allocation/free recorded by torch's
  CPU memory profiler during one extra forward+backward. GPU: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largefr.heads import MarginConfig, ShardedMarginHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, required=True, help="per-rank batch size B")
    parser.add_argument("--classes", type=int, required=True, help="total number of classes K")
    parser.add_argument("--dim", type=int, required=True, help="embedding size d")
    parser.add_argument("--world", type=int, required=True, help="number of ranks to spawn")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate in (0, 1]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="logits (GEMM) dtype")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / world)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.classes < args.world or args.dim < 1 or args.world < 1 or args.repeats < 1:
        parser.error("need --batch >= 1, --dim >= 1, --repeats >= 1 and --classes >= --world >= 1")
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_gpus(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def timed(fn, device: torch.device) -> float:
    """Milliseconds of fn(), synchronising the GPU when there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


class HeadBench:
    """One rank's head, inputs and the two things timed: a training step and its three GEMMs."""

    def __init__(self, args: argparse.Namespace, rank: int, device: torch.device):
        self.device = device
        self.head = ShardedMarginHead(args.classes, args.dim, margin=MarginConfig(), sample_rate=args.sample_rate,
                                      logits_dtype=DTYPES[args.dtype], device=device,
                                      generator=torch.Generator().manual_seed(0))
        data = torch.Generator().manual_seed(1 + rank)
        self.embeddings = torch.randn(args.batch, args.dim, generator=data).to(device).requires_grad_(True)
        self.labels = torch.randint(0, args.classes, (args.batch,), generator=data).to(device)
        self.step()  # fixes the sampled count S for the GEMM shapes
        num_sampled, batch_global = len(self.head.last_sampled), args.batch * args.world
        dtype = DTYPES[args.dtype]
        self.gemm_features = torch.randn(batch_global, args.dim, device=device).to(dtype)
        self.gemm_weight = torch.randn(num_sampled, args.dim, device=device).to(dtype)
        self.gemm_grad = torch.randn(batch_global, num_sampled, device=device).to(dtype)

    def step(self) -> None:
        self.clear_grads()
        self.forward_backward()

    def clear_grads(self) -> None:
        self.head.weight.grad = None
        self.embeddings.grad = None
        self.head.last_sampled = None  # else the profiler sees it freed without its allocation

    def forward_backward(self) -> None:
        self.head(self.embeddings, self.labels).backward()

    def gemms(self) -> None:
        features, weight, grad = self.gemm_features, self.gemm_weight, self.gemm_grad
        logits = features @ weight.t()
        grad_features = grad @ weight
        grad_weight = grad.t() @ features
        del logits, grad_features, grad_weight

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.head.weight, self.embeddings, self.labels))

    def peak_memory_mb(self) -> float:
        self.clear_grads()  # freed before measuring: the step then allocates its own gradients
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.forward_backward()
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return (self.resident_bytes() + profiled_peak_increment(self.forward_backward)) / 2**20


def profiled_peak_increment(fn) -> int:
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


def run_rank(rank: int, args: argparse.Namespace, port: int, result_dir: str) -> None:
    torch.set_num_threads(args.threads)
    gpus = use_gpus(args.world)
    device = torch.device(f"cuda:{rank}") if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpus else "gloo", rank=rank, world_size=args.world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        bench = HeadBench(args, rank, device)
        for _ in range(args.warmup):
            bench.step()
            bench.gemms()
        step_ms, gemm_ms = [], []
        for _ in range(args.repeats):
            dist.barrier()
            step_ms.append(timed(bench.step, device))
            dist.barrier()
            gemm_ms.append(timed(bench.gemms, device))
        dist.barrier()
        result = dict(rank=rank, step_ms=statistics.median(step_ms), gemm_ms=statistics.median(gemm_ms),
                      peak_mem_mb=bench.peak_memory_mb(), num_local=bench.head.partition.num_local,
                      num_sampled=len(bench.head.last_sampled), step_ms_all=step_ms, gemm_ms_all=gemm_ms)
        result["gemm_floor_ratio"] = result["step_ms"] / result["gemm_ms"]
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def machine_description(args: argparse.Namespace) -> str:
    if use_gpus(args.world):
        return f"{args.world} x {torch.cuda.get_device_name(0)}"
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(run_rank, args=(args, free_port(), result_dir), nprocs=args.world, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(result_dir, f"rank{r}.json"))) for r in range(args.world)]
    report = dict(command="python tools/bench_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine_description(args), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, threads_per_rank=args.threads, batch_per_rank=args.batch,
                  classes=args.classes, dim=args.dim, world=args.world, sample_rate=args.sample_rate,
                  dtype=args.dtype, ranks=ranks)
    print(f"{report['command']}\n{report['machine']}, torch {report['torch']}, {args.threads} thread(s)/rank")
    print("| rank | num_local | sampled | step_ms | gemm_ms | gemm_floor_ratio | peak_mem_mb |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(f"| {r['rank']} | {r['num_local']} | {r['num_sampled']} | {r['step_ms']:.1f} | {r['gemm_ms']:.1f} | "
              f"{r['gemm_floor_ratio']:.3f} | {r['peak_mem_mb']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
