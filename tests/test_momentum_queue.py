"""Momentum encoder (EMA against a hand computation) and feature queue (ring buffer, identical on all ranks)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largefr.heads.momentum import MomentumEncoder
from largefr.heads.queue import FeatureQueue


def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 6)).double()


def perturb(backbone: nn.Module, step: int) -> None:
    """One fake training step: new parameters and new BatchNorm running statistics."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype))
    backbone.train()
    backbone(torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64))


def test_momentum_encoder_equals_hand_computed_ema():
    backbone = tiny_backbone()
    encoder = MomentumEncoder(backbone, momentum=0.9)
    expected = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    for step in range(4):
        perturb(backbone, step)
        me = 0.9 if step % 2 == 0 else 0.5  # the call's momentum overrides the default
        encoder.update(backbone, momentum=None if step % 2 == 0 else 0.5)
        for name, param in backbone.named_parameters():
            expected[name] = me * expected[name] + (1 - me) * param.detach()
    for name, param in encoder.encoder.named_parameters():
        torch.testing.assert_close(param, expected[name], atol=1e-13, rtol=0)
        assert not param.requires_grad
    for (name, mine), theirs in zip(encoder.encoder.named_buffers(), backbone.buffers()):
        assert torch.equal(mine, theirs), name
    assert not torch.equal(encoder.encoder[0].weight, backbone[0].weight)


def test_momentum_encoder_forward_is_normalized_and_without_graph():
    backbone = tiny_backbone()
    perturb(backbone, 0)
    encoder = MomentumEncoder(backbone)
    encoder.update(backbone, momentum=0.0)  # momentum 0: an exact copy
    encoder.eval()
    backbone.eval()
    images = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    out = encoder(images)
    assert not out.requires_grad
    torch.testing.assert_close(out, F.normalize(backbone(images), dim=1).detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_momentum_encoder_keeps_float32_copy_of_bf16_backbone():
    backbone = tiny_backbone().to(torch.bfloat16)
    encoder = MomentumEncoder(backbone, momentum=0.999, dtype=torch.float32)
    before = encoder.encoder[4].weight.clone()
    with torch.no_grad():
        backbone[4].weight.add_(1.0)
    encoder.update(backbone)
    assert encoder.encoder[4].weight.dtype == torch.float32
    expected = 0.999 * before + 0.001 * backbone[4].weight.float()
    torch.testing.assert_close(encoder.encoder[4].weight, expected, atol=1e-7, rtol=0)
    assert (encoder.encoder[4].weight - before).abs().min() > 5e-4  # moved by about (1-me) * 1.0
    assert encoder(torch.randn(2, 3, 6, 6)).dtype == torch.float32


def test_momentum_encoder_refuses_zero3_partitioned_backbone():
    backbone = tiny_backbone()
    backbone[4].weight.ds_status = "NOT_AVAILABLE"  # what DeepSpeed ZeRO-3 attaches
    with pytest.raises(ValueError, match=r"'4.weight' is partitioned.*ZeRO stage 3"):
        MomentumEncoder(backbone)
    empty = tiny_backbone()
    encoder = MomentumEncoder(empty)
    empty[0].weight = nn.Parameter(torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="no elements on this rank"):
        encoder.update(empty)


def test_momentum_encoder_rejects_other_architecture():
    encoder = MomentumEncoder(tiny_backbone())
    with pytest.raises(ValueError, match="do not match the copy"):
        encoder.update(nn.Linear(3, 3).double())


def reference_ring(size, dim, batches):
    """Write rows one by one into a Python list ring buffer."""
    features = [torch.zeros(dim, dtype=torch.float64) for _ in range(size)]
    labels = [-1] * size
    pointer = 0
    for batch_features, batch_labels in batches:
        for row, label in zip(batch_features, batch_labels.tolist()):
            features[pointer], labels[pointer] = row, label
            pointer = (pointer + 1) % size
    return torch.stack(features), torch.tensor(labels), pointer


def test_queue_ring_buffer_wraps_like_a_list():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 50, (n,), generator=gen))
               for n in (4, 5, 9, 23, 2)]  # 23 > size: only the newest rows survive
    queue = FeatureQueue(7, 3, dtype=torch.float64)
    for step, (feats, labels) in enumerate(batches):
        queue.enqueue_global(feats, labels)
        ref_features, ref_labels, ref_pointer = reference_ring(7, 3, batches[: step + 1])
        assert torch.equal(queue.features, ref_features)
        assert torch.equal(queue.labels, ref_labels)
        assert int(queue.pointer) == ref_pointer
    restored = FeatureQueue(7, 3, dtype=torch.float64)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features, queue.features) and int(restored.pointer) == int(queue.pointer)
    assert int(restored.filled().sum()) == 7


def test_queue_rejects_wrong_shapes():
    queue = FeatureQueue(8, 4)
    with pytest.raises(ValueError, match=r"features must be \(rows, 4\), got \(2, 5\)"):
        queue.enqueue_global(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 feature rows but labels of shape"):
        queue.enqueue_global(torch.zeros(2, 4), torch.zeros(3, dtype=torch.int64))


# The queue's bit-identity across ranks (world 1-4) is checked in tests/test_cluster_bank.py, whose
# spawned job fills a real FeatureQueue anyway (one spawned job per world size keeps the suite fast).
