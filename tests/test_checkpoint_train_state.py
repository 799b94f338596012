"""The trainer's head state through `TrainingCheckpointer`, exactly, on every world-size change.

Real parts, built as the trainer builds them (`build_head`): the joint head with Partial FC
sampling (rate 0.5), CurricularFace (running state t), the cluster bank, the feature queue, the
learnable temperature and its optimizer, the row-sparse SGD with momentum and per-row step counts.
Two real steps on 2 spawned gloo ranks (37 classes: uneven shards), a checkpoint, then a fresh
build (another seed: every tensor starts different) on 1, 2, 3 and 4 ranks restores it. Rows must
equal the saved rows by class id bit for bit, the replicated state on every rank, and on the same
world size each rank's samplers and RNG state too. The trainer itself is stood in for by what a
checkpoint reads from it (the loop part's methods on a loop state and a data position, the engine, the
log): the engine is covered by tests/test_checkpoint_engine.py, the real trainer's resume by
tests/test_trainer.py.
"""
import os
from types import SimpleNamespace

import pytest
import torch

from tests.distributed_helpers import run_distributed

NUM_CLASSES, DIM, BATCH = 37, 8, 4


def _config(world: int, seed: int, output: str):
    from largefr.config import Config

    return Config.from_dict({
        "data": {"loader": "synthetic", "num_classes": NUM_CLASSES, "num_images": 370, "image_size": 32,
                 "val_targets": []},
        "model": {"network": "mbf", "embedding_size": DIM},
        "head": {"type": "curricularface", "sample_rate": 0.5},
        "cluster": {"queue_size": 16, "num_sampled_centers": 6, "temperature_mode": "learnable"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"batch_size": BATCH, "seed": seed}, "output": output}, world_size=world)


class _TrainerStandIn:
    """What a checkpoint reads from and writes to the trainer besides the head (see the module docstring)."""

    def __init__(self) -> None:
        from largefr.train.trainer import LoopState

        self.state = LoopState()
        self.runner = SimpleNamespace(engine=None)
        self.metrics = SimpleNamespace(info=lambda line: None)

    def data_position(self) -> dict[str, int]:
        return {"epoch": 0, "batch": self.state.step}

    # the loop part (largefr/stateful.py): the trainer's own methods, on this stand-in's loop state
    def checkpoint_state(self):
        from largefr.train.trainer import Trainer

        return Trainer.checkpoint_state(self)

    def restore_checkpoint_state(self, state, context) -> None:
        from largefr.train.trainer import Trainer

        Trainer.restore_checkpoint_state(self, state, context)

    def checkpoint_note(self, name: str):
        from largefr.train.trainer import Trainer

        return Trainer.checkpoint_note(name)


def _build(world: int, seed: int, root: str):
    from largefr.checkpoint.train_state import TrainingCheckpointer
    from largefr.train.build import build_head
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    config = _config(world, seed, root)
    parts = build_head(config, env)
    checkpointer = TrainingCheckpointer(os.path.join(root, "checkpoints"), head=parts.head,
                                        weight_optimizer=parts.weight_optimizer, tau_optimizer=parts.tau_optimizer,
                                        momentum_encoder=None, keep_last=2, config=config.to_dict(),
                                        device=env.device)
    return parts, checkpointer


def _snapshot(parts) -> dict:
    """Every piece of head state, by kind, cloned (written here field by field, not by the checkpointer)."""
    head = parts.head
    weight = head.margin_head.weight
    rows = {"weight": weight.detach()}
    rows.update({f"optim.{key}": value for key, value in parts.weight_optimizer.state[weight].items()})
    rows.update({f"bank.{name}": buffer for name, buffer in head.bank.named_buffers()})
    replicated = {"queue": head.queue.state_dict(), "margin": head.margin_head.adaptive.state_dict(),
                  "temperatures": {k: p.detach() for k, p in head.replicated_parameters().items()},
                  "tau_optimizer": parts.tau_optimizer.state_dict()["state"]}
    per_rank = {"margin_sampler": head.margin_head.sample_generator.get_state(),
                "center_sampler": head.sample_generator.get_state(), "torch_rng": torch.get_rng_state()}
    clone = lambda tree: {k: clone(v) if isinstance(v, dict) else v.clone() for k, v in tree.items()}  # noqa: E731
    return {"start": head.partition.start, "rows": clone(rows), "replicated": clone(replicated),
            "per_rank": clone(per_rank)}


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
    parts, checkpointer = _build(world, seed=3, root=root)
    _train_two_steps(parts, rank)
    trainer = _TrainerStandIn()
    trainer.state.step = 2
    checkpointer.save(trainer)
    return _snapshot(parts)


def _restore(rank: int, world: int, root: str) -> dict:
    parts, checkpointer = _build(world, seed=11, root=root)  # another seed: nothing starts equal
    before = _snapshot(parts)
    trainer = _TrainerStandIn()
    checkpointer.restore(trainer, os.path.join(root, "checkpoints", "step_2"))
    return {**_snapshot(parts), "before": before, "step": trainer.state.step}


def _save_and_restore_here(rank: int, world: int, root: str) -> dict:
    """Saved by these ranks, then restored by a fresh build in the same processes (the same world size)."""
    return {"saved": _save(rank, world, root), "restored": _restore(rank, world, root)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root, each rank's saved state, each rank's state restored on the same 2 ranks)."""
    root = str(tmp_path_factory.mktemp("train_state"))
    per_rank = run_distributed(_save_and_restore_here, 2, root)
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
    assert _by_class(saved_ranks, "optim.step").sum() > 0  # the steps ran: the optimizer rows are not all zero
    before = [r["before"] for r in restored]
    assert not torch.equal(_by_class(before, "weight"), _by_class(saved_ranks, "weight"))  # a test that can fail
    assert "optim.step" not in before[0]["rows"]  # a fresh optimizer: the restore creates its per-row state
    for name in names:
        assert torch.equal(_by_class(restored, name), _by_class(saved_ranks, name)), name
    for rank_state in restored:
        assert rank_state["step"] == 2
        _assert_tree_equal(rank_state["replicated"], saved_ranks[0]["replicated"], "replicated")
    if world == len(saved_ranks):  # per-rank state maps only to the same rank of the same world size
        for rank, rank_state in enumerate(restored):
            _assert_tree_equal(rank_state["per_rank"], saved_ranks[rank]["per_rank"], f"rank {rank}")
