"""The memory planner against what the head really allocates (torch's CPU memory profiler)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import RowSparseAdamW, RowSparseSGD, ShardedMarginHead
from largefr.heads.cluster import ClusterBank
from largefr.heads.precision import STORAGE_DTYPES
from largefr.heads.queue import FeatureQueue
from largefr.perf.dry_run import fake_process_group, optimizer_state_tensors, tensor_bytes
from largefr.perf.head_bench import HeadBench, HeadBenchSettings, profiled_peak_increment
from largefr.perf.memory_plan import (PlanInputs, lent_gradient_bytes, max_classes_within, plan_memory, plan_rank,
                                      sampled_count, spare_bytes)
from tests.distributed_helpers import run_distributed

TOLERANCE = 0.15  # issue 7: planner within 15% of the measured peak head memory
CLASSES, DIM, BATCH = 20000, 64, 256
HEAD_CASES = {  # (sample_rate, precision, chunk_size, weight_dtype)
    "default": (1.0, "fp32", 0, "fp32"), "partial_fc": (0.3, "fp32", 0, "fp32"), "bf16": (1.0, "bf16", 0, "fp32"),
    "chunked": (1.0, "fp32", 512, "fp32"), "chunked_partial_fc": (0.3, "fp32", 512, "fp32"),
    "chunked_bf16": (1.0, "bf16", 512, "fp32"),
    # head.weight_dtype bf16: W stored in bfloat16, its sampled rows (every row at rate 1.0) upcast
    "bf16_storage": (1.0, "fp32", 0, "bf16"), "partial_fc_bf16_storage": (0.3, "fp32", 0, "bf16"),
    "chunked_partial_fc_bf16_storage": (0.3, "fp32", 512, "bf16"),
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def measured_and_planned(case: str, classes: int, world: int, batch: int) -> tuple[float, float]:
    """(peak head memory measured like tools/bench_head.py, planner's figure), in bytes, this rank."""
    rate, precision, chunk, weight_dtype = HEAD_CASES[case]
    settings = HeadBenchSettings(batch=batch, classes=classes, dim=DIM, world=world, sample_rate=rate,
                                 dtype=DTYPE_NAMES[precision], weight_dtype=DTYPE_NAMES[weight_dtype], chunk_size=chunk,
                                 gemm_floor=False, threads=1)
    measured = HeadBench(settings, 0 if world == 1 else torch.distributed.get_rank(), torch.device("cpu"))
    peak = measured.peak_memory_mb() * 2**20
    plan = plan_memory(PlanInputs(num_classes=classes, world_size=world, dim=DIM, batch=batch, sample_rate=rate,
                                  precision=precision, weight_dtype=weight_dtype, optimizer="none", chunk_size=chunk,
                                  bank=False))
    return peak, plan.head_step_peak


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_planner_matches_measured_head_peak(case):
    measured, planned = measured_and_planned(case, CLASSES, 1, BATCH)
    assert abs(planned / measured - 1) < TOLERANCE, (case, planned / 2**20, measured / 2**20)


def _two_rank_cases(rank, world):
    # 20001 classes: rank 0 owns one class more, the planner's busiest rank
    return {case: measured_and_planned(case, CLASSES + 1, world, BATCH // world)
            for case in ("default", "chunked", "partial_fc_bf16_storage")}


def test_planner_matches_measured_head_peak_on_two_gloo_ranks():
    rank0 = run_distributed(_two_rank_cases, 2)[0]
    for case, (measured, planned) in rank0.items():
        assert abs(planned / measured - 1) < TOLERANCE, (case, planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("weight_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_step_phase_matches_measured(name, weight_dtype):
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(), sample_rate=0.3, dtype=STORAGE_DTYPES[weight_dtype],
                             generator=torch.Generator().manual_seed(0))
    optimizer = RowSparseSGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4) if name == "sgd" else \
        RowSparseAdamW([head.weight], lr=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(2):  # the first step creates the (resident) state; the second is measured
        optimizer.zero_grad()
        head(torch.randn(BATCH, DIM, generator=data), torch.randint(0, CLASSES, (BATCH,), generator=data)).backward()
        measured = tensor_bytes([head.weight.grad, *head.held_tensors()]) + profiled_peak_increment(
            lambda rows=head.last_sampled: optimizer.step(rows=rows))  # held: the head's spare buffers (CPU)
    plan = plan_memory(PlanInputs(num_classes=CLASSES, world_size=1, dim=DIM, batch=BATCH, sample_rate=0.3,
                                  optimizer=name, weight_dtype=weight_dtype, bank=False, device="cpu"))
    planned = sum(plan.phases["optimizer step"].values())
    assert abs(planned / measured - 1) < TOLERANCE, (name, weight_dtype, planned, measured)


@pytest.mark.parametrize("optimizer,weight_dtype", [("sgd", "fp32"), ("adamw", "fp32"), ("none", "fp32"),
                                                     ("sgd", "bf16"), ("adamw", "bf16")])
def test_resident_bytes_equal_the_built_tensors_on_uneven_ranks(optimizer, weight_dtype):
    classes, world = 1001, 3  # shards 334, 334, 333
    inputs = PlanInputs(num_classes=classes, world_size=world, dim=DIM, batch=4, optimizer=optimizer, queue_size=32,
                        weight_dtype=weight_dtype)
    stored = STORAGE_DTYPES[weight_dtype]
    for rank in range(world):
        with fake_process_group(world, rank):
            head = ShardedMarginHead(classes, DIM, margin=HeadConfig(), dtype=stored)
            bank = ClusterBank(classes, DIM, centers_dtype=stored)
        queue = FeatureQueue(32, DIM)
        built = {"W rows": tensor_bytes([head.weight]), "optimizer state": _state_bytes(head, optimizer),
                 "bank centers": tensor_bytes([bank.centers]),
                 "bank phi + flags": tensor_bytes([bank.phi, bank.has_phi, bank.seen, bank.queue_count]),
                 "feature queue": tensor_bytes(queue.buffers()), "local inputs": 4 * DIM * 4 + 4 * 8}
        plan = plan_rank(inputs, rank)
        assert (plan.class_start, plan.class_end) == (head.partition.start, head.partition.end)
        assert plan.resident == built, rank


def _state_bytes(head: ShardedMarginHead, name: str) -> int:
    if name == "none":
        return 0
    optimizer = RowSparseSGD([head.weight], lr=0.1, momentum=0.9) if name == "sgd" else RowSparseAdamW([head.weight])
    head.weight.grad = torch.zeros_like(head.weight)
    optimizer.step(rows=torch.arange(3))
    return tensor_bytes(optimizer_state_tensors(optimizer))


def test_plan_is_for_the_busiest_rank_of_an_uneven_split():
    inputs = PlanInputs(num_classes=85742, world_size=8, dim=DIM, batch=16)
    ranges = ClassPartition(85742, 8, 0).all_ranges()
    assert [(plan_rank(inputs, r).class_start, plan_rank(inputs, r).class_end) for r in range(8)] == ranges
    busiest = max(range(8), key=lambda r: plan_rank(inputs, r).total)
    assert plan_memory(inputs).total == plan_rank(inputs, busiest).total
    assert plan_memory(inputs).total > plan_rank(inputs, 7).total  # 10718 vs 10717 classes


def test_sampled_count_follows_the_head():
    for classes, rate in ((1000, 0.3), (30, 0.1), (997, 0.05), (500, 1.0)):
        head = ShardedMarginHead(classes, 4, margin=HeadConfig(), sample_rate=rate)
        assert sampled_count(classes, rate, global_batch=1) == max(head.num_sample, 1)
    assert sampled_count(1000, 0.01, global_batch=64) == 64  # more positives than ceil(rate * num_local)


def test_largest_class_count_within_a_budget():
    inputs = PlanInputs(num_classes=1000, world_size=4, dim=128, batch=32, sample_rate=0.2, optimizer="adamw")
    budget = 300 * 2**20
    largest = max_classes_within(inputs, budget)
    assert largest > 1000
    at = plan_memory(PlanInputs(**{**vars(inputs), "num_classes": largest}))
    beyond = plan_memory(PlanInputs(**{**vars(inputs), "num_classes": largest + 1}))
    assert at.total <= budget < beyond.total
    assert max_classes_within(inputs, 1000) == 0  # not even world_size classes fit in 1000 bytes


def _load_tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_memory_cli_prints_table_and_budget(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = _load_tool("plan_memory").main(["--classes", "1000003", "--world", "4", "--dim", "256", "--batch", "64",
                                           "--sample-rate", "0.1", "--optimizer", "adamw", "--budget-gb", "2",
                                           "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "rank 0: classes [0, 250001)" in text and "| W rows | 244.1 |" in text
    report = json.loads(out.read_text())
    assert report["plan"]["num_local"] == 250001 and report["fits"] is True
    assert f"at most {report['max_classes']:,} classes fit on 4 ranks" in text


def test_invalid_plan_inputs_are_reported(capsys):
    with pytest.raises(ValueError, match="sample_rate=1.5 must be in \\(0, 1\\]; precision='fp16' must be one of"):
        PlanInputs(num_classes=10, world_size=2, dim=4, batch=2, sample_rate=1.5, precision="fp16")
    code = _load_tool("plan_memory").main(["--classes", "3", "--world", "4", "--dim", "8", "--batch", "2"])
    assert code == 2
    assert "num_classes=3 must be >= world_size=4" in capsys.readouterr().err


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "tools" / f"{name}.py"), *args], cwd=root, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # trains at three class counts (13-17 s); the planner's own checks stay in the default run
def test_scale_classes_tool_measures_beside_the_planner(tmp_path):
    out = tmp_path / "scale.json"
    result = _run_tool("scale_classes", "--classes", "3000,12000", "--world", "1,2", "--dim", "32", "--batch", "32",
                       "--repeats", "1", "--warmup", "0", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks: all points pass" in result.stdout
    points = json.loads(out.read_text())["points"]
    assert [(p["classes"], p["world"]) for p in points] == [(3000, 1), (3000, 2), (12000, 1), (12000, 2)]
    for point in points:
        assert abs(point["planned_over_measured"] - 1) < TOLERANCE
        assert point["num_local"] == ClassPartition(point["classes"], point["world"], 0).num_local
    big = [p for p in points if p["classes"] == 12000]
    assert big[1]["measured_mb"] < 0.6 * big[0]["measured_mb"]  # per-rank memory halves on 2 ranks


def test_bench_head_pairs_low_memory_and_default_steps(tmp_path):
    out = tmp_path / "bench.json"
    result = _run_tool("bench_head", "--batch", "16", "--classes", "6001", "--dim", "32", "--world", "2",
                       "--repeats", "2", "--warmup", "0", "--chunk-size", "500", "--paired-default", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "same run, default head timed right after each low-memory step" in result.stdout
    for rank in json.loads(out.read_text())["ranks"]:
        assert abs(rank["loss"] - rank["default_loss"]) < 1e-5
        assert len(rank["step_ratio_to_default"]) == 2
        assert rank["peak_mem_mb"] < rank["default_peak_mem_mb"]


def test_run_phases_and_their_capacity(tmp_path, capsys):
    """The resume on fewer ranks holds more per rank than training; plan_memory names the phase that limits."""
    from largefr.perf.memory_plan import RUN_PHASES, max_classes_per_phase, phase_peaks

    inputs = PlanInputs(num_classes=2_000_000, world_size=2, dim=128, batch=32, sample_rate=0.1, queue_size=1024)
    base = 2**29
    to_one, same = phase_peaks(inputs, resume_world=1, base_bytes=base), phase_peaks(inputs, base_bytes=base)
    assert to_one["resume"] == base + plan_memory(PlanInputs(**{**vars(inputs), "world_size": 1})).total
    assert same["resume"] <= same["training step"] and to_one["resume"] > same["training step"]
    assert same["checkpoint save"] == base + plan_memory(inputs).resident_bytes
    per_phase = max_classes_per_phase(inputs, 4 * 2**30, resume_world=1, base_bytes=base)
    assert set(per_phase) == set(RUN_PHASES) and min(per_phase, key=per_phase.get) == "resume"
    out = tmp_path / "plan.json"
    code = _load_tool("plan_memory").main(["--classes", "2000000", "--world", "2", "--embedding-size", "128",
                                           "--batch-size", "32", "--sample-rate", "0.1", "--queue-size", "1024",
                                           "--budget-gb", "4", "--reserve-gb", "0.5", "--resume-world", "1",
                                           "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["limited_by"] == "resume" and report["max_classes_per_phase"] == per_phase
    assert f"| resume | {per_phase['resume']:,} |" in capsys.readouterr().out


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_buffers_kept_between_steps_are_the_planned_spare_and_lent_bytes(rate):
    """On CPU the head keeps, between steps, its logits' buffer, and when sampled its rows' buffer and the one its
    rows' gradient was lent in, back once the head step has dropped W's gradient (largefr.heads.spare). The planner
    counts them (spare_bytes, lent_gradient_bytes): a buffer it forgot, or one the head kept twice, fails this."""
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(), sample_rate=rate,
                             generator=torch.Generator().manual_seed(0))
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        head(torch.randn(BATCH, DIM, generator=data), torch.randint(0, CLASSES, (BATCH,), generator=data)).backward()
        head.weight.grad = None  # what the head step does after the optimizer
    inputs = PlanInputs(num_classes=CLASSES, world_size=1, dim=DIM, batch=BATCH, sample_rate=rate, optimizer="none",
                        bank=False, device="cpu")
    plan = plan_memory(inputs)
    planned = spare_bytes(inputs, plan.num_sampled, plan.num_local) + \
        lent_gradient_bytes(inputs, plan.num_sampled, plan.num_local)
    assert (lent_gradient_bytes(inputs, plan.num_sampled, plan.num_local) > 0) == (rate < 1.0)
    assert tensor_bytes(head.held_tensors()) == pytest.approx(planned, rel=1e-4)
