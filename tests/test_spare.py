"""The head's spare CPU buffers (largefr.heads.spare): a lent buffer comes back only once nothing uses its memory."""
import pytest
import torch

from largefr.heads.row_gradient import sparse_row_gradient
from largefr.heads.spare import SpareBuffers, _users

SHAPE = (1000, 16)

pytestmark = pytest.mark.skipif(_users(torch.empty(1)) is None, reason="this torch cannot count a memory's users")


def memory(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("holder", ["tensor", "view", "sparse gradient", "saved by autograd"])
def test_a_lent_buffer_is_not_taken_while_anything_uses_its_memory(holder):
    spare = SpareBuffers()
    lent = spare.lend(SHAPE, torch.float32, "cpu")
    lent.fill_(1.0)
    address = memory(lent)
    keep = {"tensor": lambda: lent,
            "view": lambda: lent[10:20],
            "sparse gradient": lambda: sparse_row_gradient(torch.arange(SHAPE[0]), lent, torch.Size((5000, SHAPE[1]))),
            "saved by autograd": lambda: (torch.ones(SHAPE[1], requires_grad=True) * lent).sum().grad_fn}[holder]()
    del lent
    other = spare.take(SHAPE, torch.float32, "cpu")  # (a micro-batch's gradient while the last one is held)
    assert memory(other) != address
    other.fill_(2.0)
    assert spare.held_tensors() == []  # nothing free: one buffer in use, the other lent out by `take`
    del keep, other
    again = spare.take(SHAPE, torch.float32, "cpu")
    assert memory(again) == address  # back once nothing uses it
    assert not any(memory(flat) == address for flat in spare.held_tensors())


def test_held_tensors_count_a_lent_buffer_only_once_it_is_unused():
    spare = SpareBuffers()
    lent = spare.lend(SHAPE, torch.float32, "cpu")
    assert spare.held_tensors() == []
    nbytes = lent.untyped_storage().nbytes()
    del lent
    assert [flat.untyped_storage().nbytes() for flat in spare.held_tensors()] == [nbytes]
