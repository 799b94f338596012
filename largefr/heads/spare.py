"""Large CPU buffers handed back by the code that finished with them, for the next step to write into.

A CPU step makes tensors of hundreds of MiB: the sampled rows of W, the logits (which the cross entropy turns into
the softmax and its backward into the logits' gradient), CurricularFace's derivative blocks. Fresh ones are fresh
pages from the kernel every step, and in a process holding gigabytes (ten million classes: 8 GiB per rank) the
kernel first compacts memory to find free huge pages for them, so the same work costs more the more classes a rank
holds (docs/PERFORMANCE.md, "Step time"). A buffer handed back is taken by the next step instead.

A buffer is handed back only where its last reader is known: the end of the backward that consumed it. One never
handed back (a forward without backward) is freed as usual. A buffer whose last reader is elsewhere (the sampled rows'
gradient, which becomes W's gradient and is last read by the head optimizer) is lent instead: it comes back by
itself once no tensor uses its memory any more. Only on CPU; a GPU's caching allocator already reuses memory.
"""
from __future__ import annotations

from typing import Sequence

import torch

SLACK = 1.0625
"""A new buffer gets this many times the elements asked for, so the next steps' slightly larger shapes (a step's
sample grows with the classes another term shares) fit in it."""
CAPACITY = 8
"""Free buffers kept at most (a step hands back two or three)."""


class SpareBuffers:
    """Flat buffers lent out in the shapes asked for, and kept when handed back."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []
        self.lent: list[tuple[torch.Tensor, int]] = []
        """Buffers `lend` gave out, with their memory's user count once this flat tensor is the only one left."""

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A contiguous, uninitialised tensor of `shape` in a handed-back buffer large enough, or in a new one."""
        shape, device = torch.Size(shape), torch.device(device)
        count = shape.numel()
        self._reclaim()
        for index, flat in enumerate(self.free):
            if flat.dtype == dtype and flat.device == device and count <= flat.numel() <= count * SLACK * SLACK:
                return _alias(self.free.pop(index), shape)
        return _alias(torch.empty(max(1, int(count * SLACK)), dtype=dtype, device=device), shape)

    def take_like(self, like: torch.Tensor) -> torch.Tensor:
        return self.take(like.shape, like.dtype, like.device)

    def lend(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """`take`, for a tensor whose last reader is not known here: its memory comes back to the free buffers once
        no tensor (the lent one, its views, a sparse gradient holding it) uses it any more. Where a torch build
        cannot count a memory's users, the buffer is simply never reused."""
        tensor = self.take(shape, dtype, device)
        flat = _whole(tensor)
        users = _users(flat)  # measured, not assumed: a torch build may count its own references too
        if users is not None:
            self.lent.append((flat, users - 1))  # less the lent tensor
        return tensor

    def give(self, *tensors: torch.Tensor) -> None:
        """Hand back the memory of `tensors` (what `take` lent, or tensors of one's own): nobody reads it afterwards."""
        self.free.extend(_whole(tensor) for tensor in tensors)
        del self.free[:-CAPACITY]

    def replace(self, tensors: list[torch.Tensor]) -> None:
        """The free buffers become those of `tensors` (a set handed back as a whole, e.g. one backward's derivative
        blocks); the ones free before are dropped."""
        self.free = []
        self.give(*tensors)

    def held_tensors(self) -> list[torch.Tensor]:
        """The free buffers, lent ones come back included (memory kept between steps and used by nobody)."""
        self._reclaim()
        return list(self.free)

    def _reclaim(self) -> None:
        """Lent buffers nobody else uses any more become free ones."""
        unused = [_users(flat) == alone for flat, alone in self.lent]
        if any(unused):
            self.give(*(flat for (flat, _), back in zip(self.lent, unused) if back))
            self.lent = [entry for entry, back in zip(self.lent, unused) if not back]


def _alias(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A new tensor of `shape` at the start of `tensor`'s memory. Not a view for autograd (a custom Function may
    modify its output in place), so it has its own version counter: what guards a lent buffer is that the head's
    graph takes one backward (its softmax is modified in place there, which autograd's version check enforces)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(tensor.untyped_storage(), 0, shape)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A flat alias of all of `tensor`'s memory (its storage, whatever part of it `tensor` shows)."""
    return _alias(tensor, (tensor.untyped_storage().nbytes() // tensor.element_size(),))


def _users(tensor: torch.Tensor) -> int | None:
    """How many tensors use `tensor`'s memory (views and aliases each count), or None where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(tensor.untyped_storage()._cdata)
