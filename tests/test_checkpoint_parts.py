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
from types import SimpleNamespace

import pytest
import torch

from largefr.stateful import EntryNote, Kind, RestoreContext, State
from tests.distributed_helpers import run_distributed

NUM_CLASSES, DIM, BATCH, SAVED_BY = 37, 8, 4, 3


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


def _config(world: int, seed: int, output: str):
    from largefr.config import Config

    return Config.from_dict({
        "data": {"loader": "synthetic", "num_classes": NUM_CLASSES, "num_images": 370, "image_size": 32,
                 "val_targets": []},
        "model": {"network": "mbf", "embedding_size": DIM},
        "head": {"type": "adaface", "sample_rate": 0.5},
        "cluster": {"queue_size": 16, "num_sampled_centers": 6, "temperature_mode": "learnable"},
        "optim": {"name": "adam", "lr": 0.01, "weight_decay": 5e-4},
        "train": {"batch_size": BATCH, "seed": seed}, "output": output}, world_size=world)


class _Loop:
    """The loop part and what else a checkpoint reads from the trainer (engine, log)."""

    def __init__(self) -> None:
        from largefr.train.trainer import LoopState

        self.state = LoopState()
        self.runner = SimpleNamespace(engine=None)
        self.metrics = SimpleNamespace(info=lambda line: None)

    def data_position(self) -> dict[str, int]:
        return {"epoch": 0, "batch": self.state.step}

    def checkpoint_state(self) -> State:
        from largefr.train.trainer import Trainer

        return Trainer.checkpoint_state(self)

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        from largefr.train.trainer import Trainer

        Trainer.restore_checkpoint_state(self, state, context)

    checkpoint_note = staticmethod(lambda name: None)


def _build(world: int, seed: int, root: str, extra=None):
    from largefr.checkpoint.train_state import TrainingCheckpointer
    from largefr.train.build import build_head
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    config = _config(world, seed, root)
    parts = build_head(config, env)
    part = parts.head.partition
    histogram = _Histogram(part.start, part.end, part.rank, seed)
    checkpointer = TrainingCheckpointer(os.path.join(root, "checkpoints"), head=parts.head,
                                        weight_optimizer=parts.weight_optimizer, tau_optimizer=parts.tau_optimizer,
                                        momentum_encoder=None, keep_last=2, config=config.to_dict(),
                                        device=env.device, extra_parts={"histogram": histogram, **(extra or {})})
    return parts, histogram, checkpointer


def _snapshot(parts, histogram) -> dict:
    """Every piece of state, by kind, cloned (read here field by field, not through the checkpoint code)."""
    head = parts.head
    weight = head.margin_head.weight
    rows = {"weight": weight.detach(), "histogram.counts": histogram.counts}
    rows.update({f"optim.{key}": value for key, value in parts.weight_optimizer.state[weight].items()})
    rows.update({f"bank.{name}": buffer for name, buffer in head.bank.named_buffers()})
    replicated = {"queue": head.queue.state_dict(), "margin": head.margin_head.adaptive.state_dict(),
                  "temperatures": {k: p.detach() for k, p in head.replicated_parameters().items()},
                  "tau_optimizer": parts.tau_optimizer.state_dict()["state"], "histogram": histogram.total}
    per_rank = {"margin_sampler": head.margin_head.sample_generator.get_state(),
                "center_sampler": head.sample_generator.get_state(), "torch_rng": torch.get_rng_state()}
    clone = lambda tree: {k: clone(v) if isinstance(v, dict) else v.clone() for k, v in tree.items()}  # noqa: E731
    return {"start": head.partition.start, "rows": clone(rows), "replicated": clone(replicated),
            "per_rank": clone(per_rank), "note": dict(histogram.note)}


def _train_two_steps(parts, rank: int) -> None:
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        parts.head.set_step(step)
        embeddings = torch.randn(BATCH, DIM, generator=data)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=data)
        loss = parts.head.training_loss(embeddings, labels, torch.randn(BATCH, DIM, generator=data))
        loss.loss.backward()
        parts.step.step(loss_scale=1.0, engine_step_applied=True, rows=loss.rows)


def _save(rank: int, world: int, root: str) -> dict:
    parts, histogram, checkpointer = _build(world, seed=3, root=root)
    _train_two_steps(parts, rank)
    loop = _Loop()
    loop.state.step = 2
    checkpointer.save(loop)
    return _snapshot(parts, histogram)


def _restore(rank: int, world: int, root: str) -> dict:
    parts, histogram, checkpointer = _build(world, seed=11, root=root)  # another seed: nothing starts equal
    before = _snapshot(parts, histogram)
    pointer = histogram.counts.data_ptr()
    loop = _Loop()
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


def _by_class(per_rank: list[dict], name: str) -> torch.Tensor:
    return torch.cat([r["rows"][name] for r in sorted(per_rank, key=lambda r: r["start"])])


def _assert_tree_equal(actual, expected, where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key in expected:
        if isinstance(expected[key], dict):
            _assert_tree_equal(actual[key], expected[key], f"{where}.{key}")
        else:
            assert torch.equal(actual[key], expected[key]), f"{where}.{key}"


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow), SAVED_BY,
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_a_part_the_checkpoint_code_never_heard_of_round_trips_with_the_real_ones(saved, world):
    root, saved_ranks, restored_here = saved
    restored = restored_here if world == SAVED_BY else run_distributed(_restore, world, root)
    names = saved_ranks[0]["rows"].keys()
    assert {"weight", "optim.step", "optim.exp_avg", "optim.exp_avg_sq", "bank.centers",
            "histogram.counts"} <= set(names)
    assert _by_class(saved_ranks, "optim.step").sum() > 0  # the steps ran
    before = [r["before"] for r in restored]
    assert not torch.equal(_by_class(before, "histogram.counts"), _by_class(saved_ranks, "histogram.counts"))
    assert "optim.step" not in before[0]["rows"]  # a fresh optimizer: the restore creates its per-row state
    for name in names:
        assert torch.equal(_by_class(restored, name), _by_class(saved_ranks, name)), name
    for rank, rank_state in enumerate(restored):
        assert rank_state["step"] == 2 and rank_state["in_place"]
        _assert_tree_equal(rank_state["replicated"], saved_ranks[0]["replicated"], "replicated")
        if world == SAVED_BY:  # per-rank state maps only to the same rank of the same world size
            _assert_tree_equal(rank_state["per_rank"], saved_ranks[rank]["per_rank"], f"rank {rank}")
            assert rank_state["note"] == saved_ranks[rank]["note"]
        else:  # each part keeps what it had: its construction seed
            _assert_tree_equal(rank_state["per_rank"], rank_state["before"]["per_rank"], f"rank {rank}")
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
            checkpointer.save(_Loop())
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
            checkpointer.restore_replicated(path, replicated, _Loop())
        else:
            checkpointer.restore(_Loop(), path)
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
