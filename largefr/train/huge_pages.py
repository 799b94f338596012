"""Large CPU tensors on transparent huge pages: PyTorch's THP_MEM_ALLOC_ENABLE, set before torch allocates.

A training step makes and frees tensors of hundreds of MiB on CPU (the sampled rows of W and their gradient,
the logits). Each new one is fresh memory from the kernel, faulted in 4 KiB pages: measured on the 2-core dev
machine, an `index_select` of 500,000 x 128 float32 rows took 193 ms into a new tensor against 68 ms with the
variable set (huge pages, 2 MiB each), and filling a new 256 MiB tensor 111 ms against 31 ms. PyTorch reads the
variable once, at its first allocation: `use_huge_pages()` runs first thing in the training entry points.
"""
from __future__ import annotations

import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> None:
    """Ask PyTorch's CPU allocator for huge pages on large tensors; a value the user set (0 to turn it off)
    wins. Call before `import torch`; the ranks a launcher starts inherit it."""
    os.environ.setdefault(VARIABLE, "1")
