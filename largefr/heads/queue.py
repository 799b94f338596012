"""Feature queue: a ring buffer of momentum features and their labels, replicated on every rank.

Every rank writes the same all-gathered global batch at the same pointer, so the queue is
identical on all ranks by construction (no broadcast needed, and a test checks it bit for bit).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_gather_rows
from largefr.stateful import EntryNote, ReplicatedModule

EMPTY_LABEL = -1


class FeatureQueue(ReplicatedModule, nn.Module):
    """Ring buffer of `size` feature rows (dim `dim`) with int64 labels; label -1 marks an empty slot.

    The buffers (`features`, `labels`, `pointer`) are registered, so `state_dict` /
    `load_state_dict` and `.to(device)` work as for any module; the checkpoint writes the whole ring once.
    """

    CHECKPOINT_NAME = "queue"
    CHECKPOINT_NOTE = EntryNote("the feature queue", "the cluster terms; its shape cluster.queue_size and "
                                "model.embedding_size")

    def __init__(self, size: int, dim: int, *, group: ProcessGroup | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.group = group
        self.register_buffer("features", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), EMPTY_LABEL, dtype=torch.int64, device=device))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def filled(self) -> torch.Tensor:
        """Boolean mask of the slots that hold a feature."""
        return self.labels != EMPTY_LABEL

    def _slots(self, rows: int) -> torch.Tensor:
        """The slots a write of `rows` rows fills (the newest `size` of them when rows > size)."""
        skipped = max(0, rows - self.size)
        return (self.pointer + torch.arange(skipped, rows, device=self.labels.device)) % self.size

    def save_before_write(self, rows: int) -> dict[str, torch.Tensor]:
        """What a write of `rows` rows overwrites (those slots and the pointer), for `restore`."""
        slots = self._slots(rows)
        return {"slots": slots, "features": self.features[slots].clone(), "labels": self.labels[slots].clone(),
                "pointer": self.pointer.clone()}

    @torch.no_grad()
    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Undo the write `saved` (from `save_before_write`) was taken for."""
        self.features[saved["slots"]] = saved["features"]
        self.labels[saved["slots"]] = saved["labels"]
        self.pointer.copy_(saved["pointer"])

    @torch.no_grad()
    def enqueue(self, local_features: torch.Tensor, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather this step's rows from every rank (equal counts) and write them; returns the global rows."""
        global_features = all_gather_rows(local_features.detach(), self.group)
        global_labels = all_gather_rows(local_labels.detach().long(), self.group)
        self.enqueue_global(global_features, global_labels)
        return global_features, global_labels

    @torch.no_grad()
    def enqueue_global(self, global_features: torch.Tensor, global_labels: torch.Tensor) -> None:
        """Write already-gathered rows (identical on every rank) at the pointer, wrapping around."""
        if global_features.dim() != 2 or global_features.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"FeatureQueue.enqueue: features must be (rows, {self.features.shape[1]}), got "
                f"{tuple(global_features.shape)}; check the momentum encoder's embedding size"
            )
        if global_labels.shape != global_features.shape[:1]:
            raise ValueError(
                f"FeatureQueue.enqueue: {global_features.shape[0]} feature rows but labels of shape "
                f"{tuple(global_labels.shape)}"
            )
        rows = global_features.shape[0]
        skipped = max(0, rows - self.size)  # more rows than slots: only the newest `size` survive a lap
        slots = self._slots(rows)
        self.features[slots] = global_features[skipped:].to(self.features.device, self.features.dtype)
        self.labels[slots] = global_labels[skipped:].to(self.labels.device, torch.int64)
        self.pointer.copy_((self.pointer + rows) % self.size)

