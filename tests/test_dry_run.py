"""Dry run of a 64-rank, 100M-identity job on a fake process group with meta tensors."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import ShardedMarginHead
from largefr.perf.dry_run import fake_process_group, tensor_bytes
from largefr.perf.memory_plan import PlanInputs, plan_rank

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "dry_run.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    return result, time.perf_counter() - started


def test_default_100m_identity_job_fits_and_runs_under_a_minute(tmp_path):
    out = tmp_path / "plan.json"
    result, seconds = dry_run("--json", str(out))  # defaults: 64 ranks, 100,000,000 classes, d 512, 80 GiB
    assert result.returncode == 0, result.stderr
    assert seconds < 60
    assert "| 63 | [98,437,500, 100,000,000) | 1,562,500 |" in result.stdout
    assert "fits: the busiest rank (0) needs" in result.stdout
    ranks = json.loads(out.read_text())["ranks"]
    inputs = PlanInputs(num_classes=100_000_000, world_size=64, dim=512, batch=128, sample_rate=0.1)
    assert len(ranks) == 64
    for rank in (0, 31, 63):
        assert ranks[rank]["total"] == plan_rank(inputs, rank).total
        assert ranks[rank]["total"] > 10 * 2**30  # far larger than this machine's memory per rank


def test_small_budget_fails_naming_the_rank_and_shortfall():
    result, _ = dry_run("--budget-gb", "12")
    assert result.returncode == 1
    assert "does not fit: rank 0 (classes [0, 1,562,500)) needs 14.40 GiB" in result.stderr
    assert "but --budget-gb is 12: short by 2.40 GiB" in result.stderr
    assert "64 of 64 ranks are over" in result.stderr


def test_uneven_small_job_prints_every_rank_range(tmp_path):
    out = tmp_path / "plan.json"
    result, _ = dry_run("--world", "3", "--classes", "1000", "--embedding-size", "8", "--batch-size", "4", "--optimizer", "adamw",
                        "--chunk-size", "64", "--budget-gb", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    for rank, (start, end) in enumerate(ClassPartition(1000, 3, 0).all_ranges()):
        assert f"| {rank} | [{start:,}, {end:,}) | {end - start:,} |" in result.stdout
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["num_local"] for r in ranks] == [334, 333, 333]


def test_fake_group_gives_each_rank_its_shape_without_memory():
    for rank in (0, 5):
        with fake_process_group(6, rank):
            assert (dist.get_world_size(), dist.get_rank()) == (6, rank)
            head = ShardedMarginHead(1_000_003, 256, margin=HeadConfig(), device="meta")
            dist.all_reduce(torch.zeros(3))  # collectives run and return without peers
        part = ClassPartition(1_000_003, 6, rank)
        assert head.weight.is_meta and tuple(head.weight.shape) == (part.num_local, 256)
        assert tensor_bytes([head.weight]) == part.num_local * 256 * 4
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="rank 6 outside \\[0, 6\\)"), fake_process_group(6, 6):
        pass
