"""Restore and reshard that stream: exact state on every world-size change, memory bounded by one block.

Checkpoints saved by 1-4 spawned gloo ranks (37 classes: uneven shards) are restored on 1-4 ranks
into destination tensors filled with garbage, through blocks that cut rows in pieces; the restored
rows must equal the saved ones bit for bit. The trainer's state (the real joint head, its
row-sparse optimizer, cluster bank, queue, learnable temperature, the margins' running state and
the samplers) goes through `TrainingCheckpointer` the same way in tests/test_checkpoint_train_state.py
and tests/test_checkpoint_parts.py. The restore and the reshard tool
must allocate no more than one block beyond the destination tensors (torch's memory profiler, as
the planner's tests use, and tracemalloc for Python buffers).
"""
import os
import tracemalloc

import pytest
import torch

from largefr.checkpoint.files import safe_load, validate_checkpoint
from largefr.checkpoint.reshard import allocate_rows, reshard_checkpoint, restore_head_rows
from largefr.checkpoint.rows import load_meta, row_span
from largefr.checkpoint.save_load import CheckpointError, load_checkpoint, save_checkpoint
from largefr.distributed.partition import ClassPartition
from largefr.perf.head_bench import profiled_peak_increment
from tests.distributed_helpers import run_distributed
from tests.test_checkpoint import NUM_CLASSES, replicated_for, rows_for

WORLDS = (1, 2, 3, 4)
TINY_BLOCK = 24  # bytes: smaller than a row of 'weight' (16 bytes) plus the next: blocks cut rows


def _save_at(rank: int, world: int, root: str, group) -> None:
    part = ClassPartition(NUM_CLASSES, world, rank)
    save_checkpoint(root, 4, engine=None, partition=part, head_rows=rows_for(torch.arange(part.start, part.end), 4),
                    head_extra={"rank": torch.tensor(rank), "note": [rank, "x"]},
                    replicated=replicated_for(4) if rank == 0 else None, group=group)


def _save_every_world(rank: int, world: int, base: str) -> None:
    """On 4 spawned ranks: the small checkpoint by the first 1, 2, 3 and 4 of them (one process group each),
    and the big one by the first 2."""
    import torch.distributed as dist

    for size in WORLDS:
        group = dist.new_group(list(range(size)))  # every rank takes part in creating every group
        if rank < size:
            _save_at(rank, size, os.path.join(base, f"w{size}"), group)
        if size == 2 and rank < size:
            _save_big(rank, size, os.path.join(base, "big"), group)
        dist.barrier()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    run_distributed(_save_every_world, 4, str(base))
    return str(base)


@pytest.fixture(scope="module")
def saved_by(saved):
    """world -> checkpoint written by that many spawned gloo ranks."""
    return {world: os.path.join(saved, f"w{world}", "step_4") for world in WORLDS}


def _garbage_like(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(t, True) if t.dtype == torch.bool else torch.full_like(t, -7)
            for name, t in rows.items()}


@pytest.mark.parametrize("old", WORLDS)
@pytest.mark.parametrize("new", WORLDS)
def test_rows_restore_exactly_through_blocks_on_every_world_change(saved_by, old, new):
    manifest = validate_checkpoint(saved_by[old])
    for rank in range(new):
        part = ClassPartition(NUM_CLASSES, new, rank)
        expected = rows_for(torch.arange(part.start, part.end), 4)
        destinations = _garbage_like(allocate_rows(manifest, part))
        versions = {name: tensor._version for name, tensor in destinations.items()}
        extra = restore_head_rows(saved_by[old], manifest, part, destinations, verify=True, block_bytes=TINY_BLOCK)
        for name in expected:
            assert destinations[name].dtype == expected[name].dtype
            assert torch.equal(destinations[name], expected[name]), (old, new, rank, name)
            # read in place behind torch's back, yet counted as a write: what was kept from the old values (the
            # bank's seen count and phi range, the forward's copy of W's rows) ends, as after copy_
            assert destinations[name]._version > versions[name], name
        if old == new:  # per-rank extras come back from the rank's own file, read without the rows
            assert extra["note"] == [rank, "x"] and torch.equal(extra["rank"], torch.tensor(rank))
        else:
            assert extra is None


def _load_into_live_rows(rank: int, world: int, paths: dict[int, str]) -> dict:
    """On 4 spawned ranks: each (old, new) case loads on a process group of the first `new` ranks."""
    import torch.distributed as dist

    outcomes = {}
    for (old, new), path in paths.items():
        group = dist.new_group(list(range(new)))
        if rank < new:
            part = ClassPartition(NUM_CLASSES, new, rank)
            live = _garbage_like(rows_for(torch.arange(part.start, part.end), 0))
            pointers = {name: t.data_ptr() for name, t in live.items()}
            loaded = load_checkpoint(path, engine=None, partition=part, rows=live, group=group)
            expected = rows_for(torch.arange(part.start, part.end), 4)
            outcomes[(old, new)] = dict(
                same_tensors=all(loaded.head_rows[name].data_ptr() == pointers[name] for name in live),
                exact=all(torch.equal(live[name], expected[name]) for name in live),
                extra=loaded.head_extra, step=loaded.step)
        dist.barrier()
    return outcomes


def test_collective_load_fills_the_live_tensors_on_spawned_ranks(saved_by):
    cases = [(2, 3), (4, 1), (3, 3), (1, 4)]
    per_rank = run_distributed(_load_into_live_rows, 4, {(old, new): saved_by[old] for old, new in cases})
    for rank, outcomes in enumerate(per_rank):
        for (old, new), outcome in outcomes.items():
            assert outcome["same_tensors"] and outcome["exact"] and outcome["step"] == 4, (old, new, rank)
            if old == new:
                assert outcome["extra"]["note"] == [rank, "x"]
            else:
                assert outcome["extra"] is None
        assert sorted(outcomes) == sorted(case for case in cases if rank < case[1])


def test_corrupted_rows_are_caught_by_the_hash_taken_while_reading(saved_by, tmp_path):
    import shutil

    path = str(tmp_path / "step_4")
    shutil.copytree(saved_by[2], path)
    head = os.path.join(path, "head_rank00001_of00002.pt")
    span = row_span(load_meta(head)["rows"]["weight"], "weight")
    data = bytearray(open(head, "rb").read())
    data[span.at(5) + 1] ^= 0x01  # inside row 5 of the classifier, same size
    open(head, "wb").write(bytes(data))
    manifest = validate_checkpoint(path)
    part = ClassPartition(NUM_CLASSES, 1, 0)
    with pytest.raises(CheckpointError, match="head_rank00001_of00002.pt does not match the sha256"):
        restore_head_rows(path, manifest, part, allocate_rows(manifest, part), verify=True)


def test_destinations_of_another_shape_or_dtype_are_refused(saved_by):
    manifest = validate_checkpoint(saved_by[2])
    part = ClassPartition(NUM_CLASSES, 3, 1)
    rows = allocate_rows(manifest, part)
    with pytest.raises(CheckpointError, match=r"'bank' are bfloat16 of shape \[12, 4\].*torch.float32"):
        restore_head_rows(saved_by[2], manifest, part, {**rows, "bank": rows["bank"].float()})
    with pytest.raises(CheckpointError, match=r"holds head rows .* but this run restores"):
        restore_head_rows(saved_by[2], manifest, part, {k: v for k, v in rows.items() if k != "phi"})


# ---------------------------------------------------------------------------- memory: one block at most

BIG_CLASSES, BIG_DIM, BLOCK = 6001, 256, 64 << 10  # 6 MiB of weight rows, 64 KiB blocks
SLACK = 64 << 10  # headers, small tensors, Python objects (the manifest, pickles)


def _big_rows(class_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    weight = class_ids.float()[:, None] + torch.linspace(0, 1, BIG_DIM)
    return {"weight": weight, "optim.momentum_buffer": -weight, "optim.step": class_ids * 3,
            "bank.has_phi": class_ids % 2 == 0}


def _save_big(rank: int, world: int, root: str, group) -> None:
    part = ClassPartition(BIG_CLASSES, world, rank)
    save_checkpoint(root, 1, engine=None, partition=part, head_rows=_big_rows(torch.arange(part.start, part.end)),
                    replicated={"config": {}} if rank == 0 else None, group=group)


@pytest.fixture(scope="module")
def big_checkpoint(saved):
    """Written by 2 spawned ranks (fixture `saved`)."""
    return os.path.join(saved, "big", "step_1")


def _peaks(action, again=None) -> tuple[int, int]:
    """(peak bytes torch allocated while `action` runs, peak bytes Python allocated while `again` (or
    `action` again) runs): two runs, as the profiler's own Python objects would count in one."""
    torch_peak = profiled_peak_increment(action)
    tracemalloc.start()
    try:
        (again or action)()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return torch_peak, python_peak


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1), (3, 1)])
def test_restore_allocates_at_most_one_block_beyond_the_destinations(big_checkpoint, world, rank):
    manifest = validate_checkpoint(big_checkpoint)
    part = ClassPartition(BIG_CLASSES, world, rank)
    destinations = allocate_rows(manifest, part)
    torch_peak, python_peak = _peaks(lambda: restore_head_rows(big_checkpoint, manifest, part, destinations,
                                                               verify=True, block_bytes=BLOCK))
    assert torch_peak <= BLOCK + SLACK, torch_peak
    assert python_peak <= BLOCK + SLACK, python_peak
    expected = _big_rows(torch.arange(part.start, part.end))
    assert all(torch.equal(destinations[name], expected[name]) for name in expected)


def test_reshard_tool_holds_one_block_and_its_output_restores_exactly(big_checkpoint, tmp_path):
    from largefr.checkpoint.files import DIGEST_BLOCK_BYTES

    out = str(tmp_path / "w3")
    lines: list[str] = []
    torch_peak, python_peak = _peaks(
        lambda: reshard_checkpoint(big_checkpoint, out, 3, log=lines.append, block_bytes=BLOCK),
        lambda: reshard_checkpoint(big_checkpoint, str(tmp_path / "again"), 3, block_bytes=BLOCK))
    assert torch_peak <= BLOCK + SLACK, torch_peak  # the old tool held every new shard: 4 MiB and more
    assert python_peak <= max(BLOCK, DIGEST_BLOCK_BYTES) + SLACK, python_peak  # hashing the new files
    assert len(lines) == 2 and "sha256 checked" in lines[0]
    manifest = validate_checkpoint(out)
    assert (manifest["world_size"], manifest["step"]) == (3, 1)
    assert safe_load(os.path.join(out, "replicated.pt"))["config"] == {}
    for rank in range(3):
        part = ClassPartition(BIG_CLASSES, 3, rank)
        rows = allocate_rows(manifest, part)
        restore_head_rows(out, manifest, part, rows, verify=True)
        expected = _big_rows(torch.arange(part.start, part.end))
        assert all(torch.equal(rows[name], expected[name]) for name in expected)
