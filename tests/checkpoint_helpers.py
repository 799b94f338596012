"""What the tests of the trainer's state through `TrainingCheckpointer` share (tests/test_checkpoint_train_state.py,
tests/test_checkpoint_parts.py, tests/test_adaptive_margin_config.py).

The head's parts built as the trainer builds them (`build_head`) on 37 classes (uneven shards on 2-4 ranks),
two real steps, a snapshot of every piece of state read field by field (not through the checkpoint code),
and a stand-in for the trainer: what a checkpoint reads from it besides the head (the loop part's own
methods on a loop state and a data position, the engine, the log).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable

import torch

NUM_CLASSES, DIM, BATCH = 37, 8, 4


def checkpoint_config(world: int, seed: int, output: str, *, head_type: str, optim: dict[str, Any],
                      head: dict[str, Any] | None = None):
    """The checkpoint tests' config; `head`: more head.* keys (head.weight_dtype)."""
    from largefr.config import Config

    return Config.from_dict({
        "data": {"loader": "synthetic", "num_classes": NUM_CLASSES, "num_images": 370, "image_size": 32,
                 "val_targets": []},
        "model": {"network": "mbf", "embedding_size": DIM},
        "head": {"type": head_type, "sample_rate": 0.5, **(head or {})},
        "cluster": {"queue_size": 16, "num_sampled_centers": 6, "temperature_mode": "learnable"},
        "optim": optim,
        "train": {"batch_size": BATCH, "seed": seed}, "output": output}, world_size=world)


class TrainerStandIn:
    """What a checkpoint reads from and writes to the trainer besides the head; the loop part
    (largefr/stateful.py) is the trainer's own methods on this stand-in's loop state."""

    def __init__(self) -> None:
        from largefr.train.trainer import LoopState

        self.state = LoopState()
        self.runner = SimpleNamespace(engine=None)
        self.metrics = SimpleNamespace(info=lambda line: None)

    def data_position(self) -> dict[str, int]:
        return {"epoch": 0, "batch": self.state.step}

    def checkpoint_state(self):
        from largefr.train.trainer import Trainer

        return Trainer.checkpoint_state(self)

    def restore_checkpoint_state(self, state, context) -> None:
        from largefr.train.trainer import Trainer

        Trainer.restore_checkpoint_state(self, state, context)

    @staticmethod
    def checkpoint_note(name: str):
        from largefr.train.trainer import Trainer

        return Trainer.checkpoint_note(name)


def build_parts(world: int, seed: int, root: str, *, head_type: str, optim: dict[str, Any],
                extra_parts: Callable[[Any], dict[str, Any]] | None = None, head: dict[str, Any] | None = None):
    """(the head's parts, their checkpointer); `extra_parts(parts)`: more parts registered with the checkpointer."""
    from largefr.checkpoint.train_state import TrainingCheckpointer
    from largefr.train.build import build_head
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    config = checkpoint_config(world, seed, root, head_type=head_type, optim=optim, head=head)
    parts = build_head(config, env)
    checkpointer = TrainingCheckpointer(os.path.join(root, "checkpoints"), head=parts.head,
                                        weight_optimizer=parts.weight_optimizer, tau_optimizer=parts.tau_optimizer,
                                        momentum_encoder=None, keep_last=2, config=config.to_dict(),
                                        device=env.device, extra_parts=extra_parts(parts) if extra_parts else None)
    return parts, checkpointer


def _clone(tree: dict) -> dict:
    return {key: _clone(value) if isinstance(value, dict) else value.clone() for key, value in tree.items()}


def snapshot(parts, *, rows: dict | None = None, replicated: dict | None = None) -> dict:
    """Every piece of head state, by kind, cloned (read here field by field, not through the checkpoint code);
    `rows` and `replicated`: more of both (another part's)."""
    head = parts.head
    weight = head.margin_head.weight
    all_rows = {"weight": weight.detach(), **(rows or {})}
    all_rows.update({f"optim.{key}": value for key, value in parts.weight_optimizer.state[weight].items()})
    all_rows.update({f"bank.{name}": buffer for name, buffer in head.bank.named_buffers()})
    all_replicated = {"queue": head.queue.state_dict(), "margin": head.margin_head.adaptive.state_dict(),
                      "temperatures": {k: p.detach() for k, p in head.replicated_parameters().items()},
                      "tau_optimizer": parts.tau_optimizer.state_dict()["state"], **(replicated or {})}
    per_rank = {"margin_sampler": head.margin_head.sample_generator.get_state(),
                "center_sampler": head.sample_generator.get_state(), "torch_rng": torch.get_rng_state()}
    return {"start": head.partition.start, "rows": _clone(all_rows), "replicated": _clone(all_replicated),
            "per_rank": _clone(per_rank)}


def train_two_steps(parts, rank: int) -> None:
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        parts.head.set_step(step)
        embeddings = torch.randn(BATCH, DIM, generator=data)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=data)
        loss = parts.head.training_loss(embeddings, labels, torch.randn(BATCH, DIM, generator=data))
        loss.loss.backward()
        parts.step.step(loss_scale=1.0, engine_step_applied=True, rows=loss.rows)


def train_and_save(parts, checkpointer, rank: int) -> None:
    """Two real steps, then a checkpoint at step 2 (the trainer's loop state through the stand-in)."""
    train_two_steps(parts, rank)
    trainer = TrainerStandIn()
    trainer.state.step = 2
    checkpointer.save(trainer)


def by_class(per_rank: list[dict], name: str) -> torch.Tensor:
    """Rows `name` of every rank's snapshot, in class order."""
    return torch.cat([r["rows"][name] for r in sorted(per_rank, key=lambda r: r["start"])])


def assert_tree_equal(actual, expected, where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key in expected:
        if isinstance(expected[key], dict):
            assert_tree_equal(actual[key], expected[key], f"{where}.{key}")
        else:
            assert torch.equal(actual[key], expected[key]), f"{where}.{key}"
