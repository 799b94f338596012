"""The checkpointer routes each part's state by kind and knows no field names (largefr/stateful.py).

A part the checkpoint code has never heard of (`_Histogram`: rows of its own, a replicated total and
a per-rank note) is registered beside the real training parts with `extra_parts` and round-trips with
them: saved by 3 spawned gloo ranks (37 classes: uneven shards 13/12/12), restored on 1, 2, 3 and 4
ranks into a fresh build of another seed. The real parts here are AdaFace (its running norm
statistics), the row-sparse AdamW (per-row step, exp_avg, exp_avg_sq), the cluster bank and queue
and the learnable temperatures; tests/test_checkpoint_train_state.py covers CurricularFace and SGD
saved by 2 ranks. Rows must equal the saved ones by class id bit for bit, in the same tensors;
replicated state on every rank; per-rank state (samplers, RNG, the note) on the same world size, and
on another one each part keeps what it has. Errors name the entry and what it is.
"""
import os

import pytest
import torch

from largefr.stateful import EntryNote, Kind, RestoreContext, State
from tests.checkpoint_helpers import (NUM_CLASSES, TrainerStandIn, assert_tree_equal, build_parts, by_class,
                                      snapshot, train_and_save)
from tests.distributed_helpers import run_distributed

SAVED_BY = 3
HEAD = {"head_type": "adaface", "optim": {"name": "adam", "lr": 0.01, "weight_decay": 5e-4}}


class _Histogram:
    """A stateful part unknown to largefr/checkpoint/: rows per class, a replicated total, a per-rank note."""

    def __init__(self, start: int, end: int, rank: int, seed: int):
        classes = torch.arange(start, end, dtype=torch.int64)
        self.counts = torch.stack([classes * seed, classes + seed], dim=1)  # rows: dim 0 is this rank's classes
        self.total = torch.tensor(float(seed))
        self.note = {"rank": rank, "seed": seed}

    def checkpoint_state(self) -> State:
        return {Kind.ROWS: {"histogram.counts": self.counts}, Kind.REPLICATED: {"histogram_total": self.total},
                Kind.PER_RANK: {"histogram_note": dict(self.note)}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        self.total = state[Kind.REPLICATED]["histogram_total"].clone()
        if Kind.PER_RANK in state:
            self.note = dict(state[Kind.PER_RANK]["histogram_note"])

    @staticmethod
    def checkpoint_note(name: str):
        return EntryNote("the histogram's state", "a test") if name.startswith("histogram") else None


def _build(world: int, seed: int, root: str, extra=None):
    """(parts, the histogram part, the checkpointer with the histogram and `extra` registered beside the real parts)."""
    def histogram_and_extra(parts) -> dict:
        part = parts.head.partition
        return {"histogram": _Histogram(part.start, part.end, part.rank, seed), **(extra or {})}

    parts, checkpointer = build_parts(world, seed, root, **HEAD, extra_parts=histogram_and_extra)
    return parts, checkpointer.parts["histogram"], checkpointer


def _snapshot(parts, histogram) -> dict:
    return {**snapshot(parts, rows={"histogram.counts": histogram.counts}, replicated={"histogram": histogram.total}),
            "note": dict(histogram.note)}


def _save(rank: int, world: int, root: str) -> dict:
    parts, histogram, checkpointer = _build(world, seed=3, root=root)
    train_and_save(parts, checkpointer, rank)
    return _snapshot(parts, histogram)


def _restore(rank: int, world: int, root: str) -> dict:
    parts, histogram, checkpointer = _build(world, seed=11, root=root)  # another seed: nothing starts equal
    before = _snapshot(parts, histogram)
    pointer = histogram.counts.data_ptr()
    loop = TrainerStandIn()
    checkpointer.restore(loop, os.path.join(root, "checkpoints", "step_2"))
    return {**_snapshot(parts, histogram), "before": before, "step": loop.state.step,
            "in_place": histogram.counts.data_ptr() == pointer}


def _save_and_restore_here(rank: int, world: int, root: str) -> dict:
    return {"saved": _save(rank, world, root), "restored": _restore(rank, world, root)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parts"))
    per_rank = run_distributed(_save_and_restore_here, SAVED_BY, root)
    return root, [r["saved"] for r in per_rank], [r["restored"] for r in per_rank]


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow), SAVED_BY,
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_a_part_the_checkpoint_code_never_heard_of_round_trips_with_the_real_ones(saved, world):
    root, saved_ranks, restored_here = saved
    restored = restored_here if world == SAVED_BY else run_distributed(_restore, world, root)
    names = saved_ranks[0]["rows"].keys()
    assert {"weight", "optim.step", "optim.exp_avg", "optim.exp_avg_sq", "bank.centers",
            "histogram.counts"} <= set(names)
    assert by_class(saved_ranks, "optim.step").sum() > 0  # the steps ran
    before = [r["before"] for r in restored]
    assert not torch.equal(by_class(before, "histogram.counts"), by_class(saved_ranks, "histogram.counts"))
    assert "optim.step" not in before[0]["rows"]  # a fresh optimizer: the restore creates its per-row state
    for name in names:
        assert torch.equal(by_class(restored, name), by_class(saved_ranks, name)), name
    for rank, rank_state in enumerate(restored):
        assert rank_state["step"] == 2 and rank_state["in_place"]
        assert_tree_equal(rank_state["replicated"], saved_ranks[0]["replicated"], "replicated")
        if world == SAVED_BY:  # per-rank state maps only to the same rank of the same world size
            assert_tree_equal(rank_state["per_rank"], saved_ranks[rank]["per_rank"], f"rank {rank}")
            assert rank_state["note"] == saved_ranks[rank]["note"]
        else:  # each part keeps what it had: its construction seed
            assert_tree_equal(rank_state["per_rank"], rank_state["before"]["per_rank"], f"rank {rank}")
            assert rank_state["note"] == {"rank": rank, "seed": 11}


# ---------------------------------------------------------------------------- refusals, one process


class _Extra(_Histogram):
    def checkpoint_state(self) -> State:
        return {Kind.REPLICATED: {"extra_total": self.total}}

    @staticmethod
    def checkpoint_note(name: str):
        return EntryNote("the extra part's total", "a test") if name == "extra_total" else None


def _refusal(case: str, root: str) -> str:
    from largefr.checkpoint.files import safe_load
    from largefr.checkpoint.save_load import CheckpointError

    if case == "twice":
        copy = _Histogram(0, NUM_CLASSES, 0, 3)
        _, _, checkpointer = _build(1, seed=3, root=root, extra={"copy": copy})
        try:
            checkpointer.save(TrainerStandIn())
        except ValueError as error:
            return str(error)
        return "saved"
    extra = {"extra": _Extra(0, 1, 0, 5)} if case == "lacks" else {}
    _, _, checkpointer = _build(1, seed=11, root=root, extra=extra)
    path = os.path.join(root, "checkpoints", "step_2")
    if case == "holds":
        checkpointer.parts.pop("histogram")
    try:
        if case == "shape":  # as if replicated.pt had been written with another cluster.queue_size
            replicated = safe_load(os.path.join(path, "replicated.pt"))
            replicated["queue"]["features"] = replicated["queue"]["features"][:8]
            checkpointer.restore_replicated(path, replicated, TrainerStandIn())
        else:
            checkpointer.restore(TrainerStandIn(), path)
    except CheckpointError as error:
        return str(error)
    return "restored"


def _refusals(rank: int, world: int, root: str, cases: list[str]) -> dict[str, str]:
    return {case: _refusal(case, root) for case in cases}


REFUSALS = {
    "lacks": r"lacks the extra part's total \['extra_total'\] \(replicated.pt; a test\): resume with the settings it "
             "was written with",
    "holds": r"\(the head files\) holds \['histogram.counts'\], which no part of this run restores \(parts: loop, "
             r"head, head_optimizer, rng, tau_optimizer\)",
    "shape": r"step_2/replicated.pt: key 'queue.features' has shape \[8, 8\], this run's is \[16, 8\]; 'queue' is "
             r"the feature queue \(the cluster terms; its shape cluster.queue_size and model.embedding_size\)",
    "twice": r"checkpoint entry 'histogram.counts' \(rows\) is given by parts 'histogram' and 'copy'",
}


def test_entries_missing_unclaimed_misshapen_or_given_twice_are_named(saved):
    import re

    messages = run_distributed(_refusals, 1, saved[0], list(REFUSALS))[0]
    for case, expected in REFUSALS.items():
        assert re.search(expected, messages[case]), (case, messages[case])
