"""Large CPU buffers handed back by the code that finished with them, for the next step to write into.

A CPU step makes tensors of hundreds of MiB: the sampled rows of W, the logits (which the cross entropy turns into
the softmax and its backward into the logits' gradient), CurricularFace's derivative blocks. Fresh ones are fresh
pages from the kernel every step, and in a process holding gigabytes (ten million classes: 8 GiB per rank) the
kernel first compacts memory to find free huge pages for them, so the same work costs more the more classes a rank
holds (docs/PERFORMANCE.md, "Step time"). A buffer handed back is taken by the next step instead.

A buffer is handed back only where its last reader is known: the end of the backward that consumed it. One never
handed back (a forward without backward) is freed as usual. Autograd's version counter guards the rest: a buffer
taken again is written through `out=`, so a graph still holding it (a second backward with retain_graph) raises
instead of reading new values. Only on CPU; a GPU's caching allocator already reuses memory.
"""
from __future__ import annotations

from typing import Sequence

import torch

CAPACITY = 8
"""Buffers kept at most (a step hands back two or three; older ones, e.g. of a shape no longer used, are freed)."""


class SpareBuffers:
    """Handed-back buffers, taken by shape, dtype and device."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A handed-back buffer of this shape, dtype and device, or a new (uninitialised) one."""
        shape, device = torch.Size(shape), torch.device(device)
        for index, buffer in enumerate(self.free):
            if buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
                return self.free.pop(index)
        return torch.empty(shape, dtype=dtype, device=device)

    def take_like(self, like: torch.Tensor) -> torch.Tensor:
        return self.take(like.shape, like.dtype, like.device)

    def give(self, *buffers: torch.Tensor) -> None:
        """Hand back buffers nobody reads any more (whole, contiguous tensors; views are not kept)."""
        self.free.extend(buffer for buffer in buffers if buffer._base is None and buffer.is_contiguous())
        del self.free[:-CAPACITY]

    def replace(self, buffers: list[torch.Tensor]) -> None:
        """The free buffers become `buffers` (a set handed back as a whole, e.g. one backward's derivative blocks)."""
        self.free = buffers
