"""The trainer's head state through `TrainingCheckpointer`, exactly, on every world-size change.

Real parts, built as the trainer builds them (`build_head`): the joint head with Partial FC
sampling (rate 0.5), CurricularFace (running state t), the cluster bank, the feature queue, the
learnable temperature and its optimizer, the row-sparse SGD with momentum and per-row step counts.
Two real steps on 2 spawned gloo ranks (37 classes: uneven shards), a checkpoint, then a fresh
build (another seed: every tensor starts different) on 1, 2, 3 and 4 ranks restores it. Rows must
equal the saved rows by class id bit for bit, the replicated state on every rank, and on the same
world size each rank's samplers and RNG state too. The trainer itself is stood in for by what a
checkpoint reads from it (the loop part's methods on a loop state and a data position, the engine, the
log; tests/checkpoint_helpers.py): the engine is covered by tests/test_checkpoint_engine.py, the real trainer's resume by
tests/test_trainer.py.
"""
import os

import pytest
import torch

from tests.checkpoint_helpers import (TrainerStandIn, assert_tree_equal, build_parts, by_class, snapshot,
                                      train_and_save)
from tests.distributed_helpers import run_distributed

HEAD = {"head_type": "curricularface", "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}


def _build(world: int, seed: int, root: str):
    return build_parts(world, seed, root, **HEAD)


def _save(rank: int, world: int, root: str) -> dict:
    parts, checkpointer = _build(world, seed=3, root=root)
    train_and_save(parts, checkpointer, rank)
    return snapshot(parts)


def _restore(rank: int, world: int, root: str) -> dict:
    parts, checkpointer = _build(world, seed=11, root=root)  # another seed: nothing starts equal
    before = snapshot(parts)
    trainer = TrainerStandIn()
    checkpointer.restore(trainer, os.path.join(root, "checkpoints", "step_2"))
    return {**snapshot(parts), "before": before, "step": trainer.state.step}


def _save_and_restore_here(rank: int, world: int, root: str) -> dict:
    """Saved by these ranks, then restored by a fresh build in the same processes (the same world size)."""
    return {"saved": _save(rank, world, root), "restored": _restore(rank, world, root)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root, each rank's saved state, each rank's state restored on the same 2 ranks)."""
    root = str(tmp_path_factory.mktemp("train_state"))
    per_rank = run_distributed(_save_and_restore_here, 2, root)
    return root, [r["saved"] for r in per_rank], [r["restored"] for r in per_rank]


SLOW = pytest.mark.slow


# the default run keeps 2 -> 2 (restored in the fixture's processes); rows re-split on every world change
# are in the default run of tests/test_checkpoint_stream.py
@pytest.mark.parametrize("world", [pytest.param(1, marks=SLOW), 2, pytest.param(3, marks=SLOW),
                                   pytest.param(4, marks=SLOW)])
def test_head_state_restores_exactly_on_another_world_size(saved, world):
    root, saved_ranks, restored_here = saved
    restored = restored_here if world == len(saved_ranks) else run_distributed(_restore, world, root)
    names = saved_ranks[0]["rows"].keys()
    assert {"weight", "optim.step", "optim.momentum_buffer", "bank.centers", "bank.phi"} <= set(names)
    assert by_class(saved_ranks, "optim.step").sum() > 0  # the steps ran: the optimizer rows are not all zero
    before = [r["before"] for r in restored]
    assert not torch.equal(by_class(before, "weight"), by_class(saved_ranks, "weight"))  # a test that can fail
    assert "optim.step" not in before[0]["rows"]  # a fresh optimizer: the restore creates its per-row state
    for name in names:
        assert torch.equal(by_class(restored, name), by_class(saved_ranks, name)), name
    for rank_state in restored:
        assert rank_state["step"] == 2
        assert_tree_equal(rank_state["replicated"], saved_ranks[0]["replicated"], "replicated")
    if world == len(saved_ranks):  # per-rank state maps only to the same rank of the same world size
        for rank, rank_state in enumerate(restored):
            assert_tree_equal(rank_state["per_rank"], saved_ranks[rank]["per_rank"], f"rank {rank}")
