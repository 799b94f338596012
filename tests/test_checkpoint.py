"""Checkpoints: atomic writes, keep-last, head rows by class id across world sizes, safe loading.

The first part uses real gloo ranks without an engine (fast); the DeepSpeed engine cases are in
tests/test_checkpoint_engine.py.
"""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from largefr.checkpoint.files import file_digest, safe_load, save_file
from largefr.checkpoint.engine import engine_mismatch
from largefr.checkpoint.rng import capture_rng_state, restore_rng_state
from largefr.checkpoint.save_load import (CheckpointError, find_latest_checkpoint, load_checkpoint, load_head_rows,
                                          resolve_checkpoint, save_checkpoint)
from largefr.distributed.partition import ClassPartition
from tests.distributed_helpers import run_distributed

NUM_CLASSES = 37  # uneven on 2, 3 and 4 ranks
ROW_WIDTHS = {"weight": [4], "bank": [4], "phi": [], "has_phi": [], "weight_exp_avg": [4]}


def rows_for(class_ids: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """Head rows whose values identify their class id and the step they were saved at."""
    ids = class_ids.double()
    return {"weight": (ids[:, None] * 10 + torch.arange(4) + step / 1000).float(),
            "bank": (-ids[:, None] * torch.ones(4)).to(torch.bfloat16),
            "phi": ids / 100 + step,
            "has_phi": class_ids % 3 == 0,
            "weight_exp_avg": (ids[:, None] * 0.5 + torch.arange(4)).float()}


def replicated_for(step: int) -> dict:
    return {"queue": torch.arange(12.0).view(3, 4) + step, "tau": torch.tensor(0.07), "epoch": step // 2,
            "data_position": {"epoch": 0, "batches": step}, "config": {"train": {"batch_size": 8}}}


def _save_steps(rank, world, root, steps, keep_last):
    part = ClassPartition(NUM_CLASSES, world, rank)
    for step in steps:
        extra = {"rank": rank, "rng": capture_rng_state()}
        rows = rows_for(torch.arange(part.start, part.end), step)
        save_checkpoint(root, step, engine=None, partition=part, head_rows=rows, head_extra=extra,
                        replicated=replicated_for(step) if rank == 0 else None, keep_last=keep_last)
    return sorted(os.listdir(root))


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory):
    """Steps 1-4 saved by 2 gloo ranks with keep_last=2."""
    root = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    listings = run_distributed(_save_steps, 2, root, [1, 2, 3, 4], 2)
    return root, listings


@pytest.fixture
def root_copy(saved_root, tmp_path):
    copy = str(tmp_path / "checkpoints")
    shutil.copytree(saved_root[0], copy)
    return copy


def test_keep_last_and_no_leftovers(saved_root):
    root, listings = saved_root
    assert listings == [["step_3", "step_4"]] * 2
    assert sorted(os.listdir(os.path.join(root, "step_4"))) == [
        "head_rank00000_of00002.pt", "head_rank00001_of00002.pt", "manifest.json", "replicated.pt"]


def test_manifest_records_every_file(saved_root):
    path = os.path.join(saved_root[0], "step_4")
    with open(os.path.join(path, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert (manifest["step"], manifest["world_size"], manifest["num_classes"], manifest["complete"]) == (4, 2, 37, True)
    assert manifest["rows"]["weight"] == {"shape": [4], "dtype": "float32"}
    assert manifest["rows"]["bank"]["dtype"] == "bfloat16"
    for name, entry in manifest["files"].items():
        assert file_digest(os.path.join(path, name)) == entry


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rows_resplit_by_class_id(saved_root, world):
    path = os.path.join(saved_root[0], "step_4")
    for rank in range(world):
        part = ClassPartition(NUM_CLASSES, world, rank)
        rows = load_head_rows(path, part)
        expected = rows_for(torch.arange(part.start, part.end), 4)
        assert rows.keys() == expected.keys()
        for name in expected:
            assert rows[name].dtype == expected[name].dtype
            torch.testing.assert_close(rows[name], expected[name], rtol=0, atol=0)


def test_load_on_one_rank_returns_state_and_drops_rank_extras(saved_root):
    loaded = load_checkpoint(resolve_checkpoint("auto", saved_root[0]), engine=None,
                             partition=ClassPartition(NUM_CLASSES, 1, 0), expected_rows=ROW_WIDTHS)
    assert loaded.step == 4 and loaded.saved_world_size == 2
    assert loaded.head_extra is None  # per-rank RNG states of 2 ranks do not map to 1 rank
    expected = replicated_for(4)
    torch.testing.assert_close(loaded.replicated["queue"], expected["queue"])
    assert loaded.replicated["data_position"] == expected["data_position"]
    assert loaded.replicated["config"] == expected["config"] and loaded.replicated["step"] == 4
    torch.testing.assert_close(loaded.head_rows["phi"], rows_for(torch.arange(NUM_CLASSES), 4)["phi"])


def _load_same_world(rank, world, path):
    loaded = load_checkpoint(path, engine=None, partition=ClassPartition(NUM_CLASSES, world, rank),
                             expected_rows=ROW_WIDTHS)
    return loaded.head_extra["rank"], loaded.head_rows["weight"]


def test_same_world_size_returns_each_ranks_extras(saved_root):
    path = os.path.join(saved_root[0], "step_4")
    results = run_distributed(_load_same_world, 2, path)
    assert [rank for rank, _ in results] == [0, 1]
    assert [rows.shape[0] for _, rows in results] == [19, 18]


def test_interrupted_checkpoints_are_never_picked(root_copy):
    tmp_dir = os.path.join(root_copy, "step_9.tmp-12345")  # a writer killed just before the rename
    shutil.copytree(os.path.join(root_copy, "step_4"), tmp_dir)
    no_manifest = os.path.join(root_copy, "step_8")
    shutil.copytree(os.path.join(root_copy, "step_4"), no_manifest)
    os.remove(os.path.join(no_manifest, "manifest.json"))
    assert find_latest_checkpoint(root_copy) == os.path.join(root_copy, "step_4")
    head = os.path.join(root_copy, "step_4", "head_rank00001_of00002.pt")
    with open(head, "r+b") as handle:
        handle.truncate(os.path.getsize(head) // 2)
    assert find_latest_checkpoint(root_copy) == os.path.join(root_copy, "step_3")
    with pytest.raises(CheckpointError, match="head_rank00001_of00002.pt has .* bytes.*truncated"):
        resolve_checkpoint(os.path.join(root_copy, "step_4"), root_copy)
    with pytest.raises(CheckpointError, match="no manifest.json: it was interrupted"):
        resolve_checkpoint(no_manifest, root_copy)
    os.remove(os.path.join(tmp_dir, "manifest.json"))  # killed before the manifest was written
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_head_rows(tmp_dir, ClassPartition(NUM_CLASSES, 1, 0))


def test_no_complete_checkpoint_gives_none_for_auto(tmp_path):
    assert resolve_checkpoint("auto", str(tmp_path / "missing")) is None
    assert resolve_checkpoint(None, str(tmp_path)) is None


def test_other_num_classes_or_width_is_refused(saved_root):
    path = os.path.join(saved_root[0], "step_4")
    with pytest.raises(CheckpointError, match="num_classes=37 but this run has num_classes=38"):
        load_head_rows(path, ClassPartition(38, 1, 0))
    wider = {**ROW_WIDTHS, "weight": [8]}
    with pytest.raises(CheckpointError, match=r"'weight' have width \[4\] but this run expects \[8\]"):
        load_checkpoint(path, engine=None, partition=ClassPartition(NUM_CLASSES, 1, 0), expected_rows=wider)


def test_corrupted_file_fails_the_digest(root_copy):
    path = os.path.join(root_copy, "step_4")
    replicated = os.path.join(path, "replicated.pt")
    data = bytearray(open(replicated, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    open(replicated, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="replicated.pt does not match the sha256"):
        load_checkpoint(path, engine=None, partition=ClassPartition(NUM_CLASSES, 1, 0))


class _Payload:
    """Pickles as a call of open(marker, 'w'): loading it without restriction creates the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickled_callable(path: str, marker: str) -> None:
    head_name = "head_rank00000_of00002.pt"
    head_path = os.path.join(path, head_name)
    head = safe_load(head_path)
    head["extra"]["payload"] = _Payload(marker)
    torch.save(head, head_path)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["files"][head_name] = file_digest(head_path)  # consistent manifest: only the pickle is bad
    json.dump(manifest, open(manifest_path, "w"))


def test_pickled_callable_is_refused_and_not_run(root_copy, tmp_path):
    path = os.path.join(root_copy, "step_4")
    marker = str(tmp_path / "payload_ran")
    _plant_pickled_callable(path, marker)
    with pytest.raises(CheckpointError, match="head_rank00000_of00002.pt: refused to load"):
        load_head_rows(path, ClassPartition(NUM_CLASSES, 1, 0))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path, engine=None, partition=ClassPartition(NUM_CLASSES, 1, 0))
    assert not os.path.exists(marker)
    torch.load(os.path.join(path, "head_rank00000_of00002.pt"), weights_only=False)  # the unsafe way runs it
    assert os.path.exists(marker)


def _one_rank(step=5):
    part = ClassPartition(NUM_CLASSES, 1, 0)
    return dict(engine=None, partition=part, head_rows=rows_for(torch.arange(NUM_CLASSES), step),
                replicated=replicated_for(step))


def test_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path):
    args = _one_rank()
    args["replicated"] = {**args["replicated"], "sampler": np.arange(3)}
    with pytest.raises(CheckpointError, match=r"replicated state\['sampler'\] is a numpy.ndarray"):
        save_checkpoint(str(tmp_path), 5, **args)
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_rows_must_match_the_partition(tmp_path):
    args = _one_rank()
    args["head_rows"] = {**args["head_rows"], "phi": torch.zeros(36)}
    with pytest.raises(CheckpointError, match=r"'phi' have shape \[36\]; dim 0 must be num_local = 37"):
        save_checkpoint(str(tmp_path), 5, **args)


def test_saving_a_step_again_replaces_it(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 5, **_one_rank(step=5))
    save_checkpoint(root, 5, **_one_rank(step=6))  # same step number, new content
    assert sorted(os.listdir(root)) == ["step_5"]
    rows = load_head_rows(os.path.join(root, "step_5"), ClassPartition(NUM_CLASSES, 1, 0))
    torch.testing.assert_close(rows["phi"], rows_for(torch.arange(NUM_CLASSES), 6)["phi"])


def test_checkpoints_of_an_abandoned_later_timeline_are_set_aside(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 10, **_one_rank(step=10))
    save_checkpoint(root, 7, **_one_rank(step=7))  # resumed from an older checkpoint and saved again
    assert find_latest_checkpoint(root) == os.path.join(root, "step_7")
    assert sorted(os.listdir(root)) == ["step_10.superseded", "step_7"]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    save_file(state, str(tmp_path / "rng.pt"), "rng")
    restore_rng_state(safe_load(str(tmp_path / "rng.pt")))
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


@pytest.mark.parametrize("saved, stage, world, reason", [
    (dict(format="native", zero_stage=1, world_size=2), 1, 2, None),
    (dict(format="native", zero_stage=0, world_size=2), 0, 3, None),   # not partitioned
    (dict(format="native", zero_stage=1, world_size=2), 1, 3, "saved by 2 ranks and do not load on 3"),
    (dict(format="native", zero_stage=1, world_size=2), 2, 2, "stage 1 and this run uses stage 2"),
    (dict(format="universal", zero_stage=1, world_size=2), 2, 5, None),
    (dict(format="universal", zero_stage=1, world_size=2), 0, 2, "ZeRO stage 0 cannot load"),
])
def test_when_the_engine_optimizer_state_loads(saved, stage, world, reason):
    """The decision behind engine_optimizer_restored (the real loads are in test_checkpoint_engine.py)."""
    mismatch = engine_mismatch(saved, stage, world)
    assert (mismatch is None) == (reason is None)
    if reason is not None:
        assert reason in mismatch
