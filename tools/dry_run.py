"""Dry run of a job far larger than this machine: every rank's head laid out on a fake process group.

    python tools/dry_run.py --world 64 --classes 100000000 --embedding-size 512 --batch-size 128 --budget-gb 80

For each rank r of `--world`, in this one process: a fake process group answers as rank r
(largefr.perf.dry_run), and the rank's real ShardedMarginHead, ClusterBank, FeatureQueue
and row-sparse optimizer state are built on the meta device (shapes, no memory). The bytes of
those tensors are compared with the memory planner (largefr.perf.memory_plan; they must match
exactly: a mismatch means the planner no longer describes the code), and the planner adds the
step's peak (logits, gradients, gathered features). Prints each rank's class range and memory;
exits 1 naming the first rank that does not fit `--budget-gb` and by how much, 2 when the planner
and the constructed rank disagree.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from largefr.cli import write_json
from largefr.config import HeadConfig
from largefr.heads import RowSparseAdamW, RowSparseSGD, ShardedMarginHead
from largefr.heads.cluster import ClusterBank
from largefr.heads.precision import STORAGE_DTYPES
from largefr.heads.queue import FeatureQueue
from largefr.perf.dry_run import fake_process_group, optimizer_state_tensors, tensor_bytes
from largefr.perf.memory_plan import GIB, PlanInputs, max_classes_within, plan_rank
from largefr.perf.plan_options import add_plan_options, plan_inputs

META = torch.device("meta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_plan_options(parser, classes=100_000_000, world=64, dim=512, batch=128, sample_rate=0.1)
    parser.add_argument("--budget-gb", type=float, default=80.0, help="memory per rank for the head, GiB")
    parser.add_argument("--json", default=None, help="write every rank's plan to this JSON file")
    return parser.parse_args(argv)


def build_rank_on_meta(args: argparse.Namespace) -> dict:
    """This (fake) rank's head, bank, queue and optimizer state on meta; their bytes and class range."""
    stored = STORAGE_DTYPES[args.weight_dtype]
    head = ShardedMarginHead(args.classes, args.dim, margin=HeadConfig(), sample_rate=args.sample_rate,
                             device=META, dtype=stored, chunk_size=args.chunk_size)
    built = {"class_range": (head.partition.start, head.partition.end), "W rows": tensor_bytes([head.weight]),
             "optimizer state": _optimizer_state_bytes(head.weight, args.optimizer),
             "bank centers": 0, "bank phi + flags": 0, "feature queue": 0}
    if not args.no_bank:
        bank = ClusterBank(args.classes, args.dim, centers_dtype=stored, device=META)
        if (bank.partition.start, bank.partition.end) != built["class_range"]:
            raise AssertionError(f"bank and head disagree on the class range: {bank.partition} vs {head.partition}")
        built["bank centers"] = tensor_bytes([bank.centers])
        built["bank phi + flags"] = tensor_bytes([bank.phi, bank.has_phi, bank.seen, bank.queue_count])
        built["feature queue"] = tensor_bytes(FeatureQueue(args.queue_size, args.dim, device=META).buffers())
    return built


def _optimizer_state_bytes(weight: torch.nn.Parameter, name: str) -> int:
    """Bytes of the row-sparse optimizer's state once it exists (created by a step over no rows)."""
    if name == "none":
        return 0
    optimizer = RowSparseSGD([weight], lr=0.1, momentum=0.9) if name == "sgd" else RowSparseAdamW([weight])
    weight.grad = torch.empty_like(weight)
    optimizer.step(rows=torch.empty(0, dtype=torch.long, device=META))
    weight.grad = None
    return tensor_bytes(optimizer_state_tensors(optimizer))


def compare_with_plan(rank: int, built: dict, plan) -> list[str]:
    problems = []
    if built["class_range"] != (plan.class_start, plan.class_end):
        problems.append(f"rank {rank}: built class range {built['class_range']} but the planner has "
                        f"[{plan.class_start}, {plan.class_end})")
    for name, size in built.items():
        if name != "class_range" and plan.resident[name] != size:
            problems.append(f"rank {rank}: {name} built {size} bytes, planned {plan.resident[name]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    inputs = plan_inputs(args)
    budget = int(args.budget_gb * GIB)
    print(f"dry run: {args.world} ranks, {args.classes:,} classes, d = {args.dim}, B = {args.batch}/rank "
          f"(B_g = {inputs.global_batch}), sample rate {args.sample_rate}, logits {args.precision}, "
          f"W stored {args.weight_dtype}, optimizer "
          f"{args.optimizer}, chunk_size {args.chunk_size}, bank {'off' if args.no_bank else 'on'}; "
          f"budget {args.budget_gb:g} GiB/rank")
    print("| rank | classes [start, end) | local | resident GiB (built = planned) | step peak GiB | total GiB |")
    print("|---:|---|---:|---:|---:|---:|")
    plans, mismatches = [], []
    for rank in range(args.world):
        with fake_process_group(args.world, rank):
            built = build_rank_on_meta(args)
        plan = plan_rank(inputs, rank)
        mismatches += compare_with_plan(rank, built, plan)
        plans.append(plan)
        print(f"| {rank} | [{plan.class_start:,}, {plan.class_end:,}) | {plan.num_local:,} | "
              f"{plan.resident_bytes / GIB:.2f} | {plan.step_peak / GIB:.2f} | {plan.total / GIB:.2f} |")
    if args.json:
        write_json(args.json, dict(inputs=vars(args), ranks=[p.as_dict() for p in plans]))
    print(f"done in {time.perf_counter() - started:.1f} s")
    if mismatches:
        print("planner and the constructed ranks disagree:\n  " + "\n  ".join(mismatches), file=sys.stderr)
        return 2
    return report_budget(plans, inputs, budget, args.budget_gb)


def report_budget(plans: list, inputs: PlanInputs, budget: int, budget_gb: float) -> int:
    over = [p for p in plans if p.total > budget]
    if not over:
        worst = max(plans, key=lambda p: p.total)
        print(f"fits: the busiest rank ({worst.rank}) needs {worst.total / GIB:.2f} GiB of {budget_gb:g} GiB")
        return 0
    first = over[0]
    largest = max_classes_within(inputs, budget)
    print(f"does not fit: rank {first.rank} (classes [{first.class_start:,}, {first.class_end:,})) needs "
          f"{first.total / GIB:.2f} GiB (resident {first.resident_bytes / GIB:.2f} + step peak "
          f"{first.step_peak / GIB:.2f}, {first.peak_phase}) but --budget-gb is {budget_gb:g}: short by "
          f"{(first.total - budget) / GIB:.2f} GiB; {len(over)} of {len(plans)} ranks are over. At most "
          f"{largest:,} classes fit on {inputs.world_size} ranks with these settings; or use more ranks, a "
          "lower --sample-rate, or the low-memory head (--chunk-size)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
