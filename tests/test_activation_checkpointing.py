"""model.activation_checkpointing: every backbone family gives the plain model's gradients and statistics."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from largefr.models import get_model
from largefr.models.iresnet import IResNet
from largefr.models.mobilefacenet import MobileFaceNet
from largefr.models.vit import VisionTransformer

FAMILIES = {
    "iresnet": lambda flag: IResNet(layers=(2, 1, 1, 1), image_size=16, embedding_size=8,
                                    activation_checkpointing=flag),
    "mobilefacenet": lambda flag: MobileFaceNet(blocks=(2, 2, 1, 1), scale=1, image_size=16, embedding_size=8,
                                                activation_checkpointing=flag),
    # drop path and patch masking on: the recomputation must draw the same random numbers
    "vit": lambda flag: VisionTransformer(width=16, depth=3, embedding_size=8, image_size=27, drop_path_rate=0.5,
                                          mask_ratio=0.3, activation_checkpointing=flag),
}
SIDES = {"iresnet": 16, "mobilefacenet": 16, "vit": 27}


def _train_step(model: nn.Module, images: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model(images)
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_and_running_statistics_equal_the_plain_backbone(family):
    torch.manual_seed(0)
    plain, recomputed = FAMILIES[family](False), FAMILIES[family](True)
    recomputed.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, SIDES[family], SIDES[family])
    for step in range(2):
        out_plain = _train_step(plain, images, seed=step)
        out_recomputed = _train_step(recomputed, images, seed=step)
        torch.testing.assert_close(out_recomputed, out_plain, rtol=0, atol=0)
    for (key, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=key)
    for key, buffer in plain.state_dict().items():  # BatchNorm running stats and counters moved once per step
        torch.testing.assert_close(recomputed.state_dict()[key], buffer, rtol=0, atol=0, msg=key)


def test_plain_torch_checkpoint_would_move_batchnorm_statistics_twice():
    """Why largefr/models/recompute.py exists: the test above fails without it."""
    norm = nn.BatchNorm1d(3)
    x = torch.randn(8, 3, requires_grad=True)
    checkpoint(norm, x, use_reentrant=False).sum().backward()
    assert int(norm.num_batches_tracked) == 2


def test_checkpointing_only_in_training_with_gradients():
    model = FAMILIES["mobilefacenet"](True)
    calls = []
    import largefr.models.mobilefacenet as mobilefacenet

    original = mobilefacenet.checkpointed
    mobilefacenet.checkpointed = lambda unit, x: calls.append(unit) or original(unit, x)
    try:
        images = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            model(images)
        model.eval()(images)
        assert calls == []
        model.train()(images)
        assert len(calls) == len(model._checkpoint_units()) == 10  # 8 stages, the 2-block Residual ones split
    finally:
        mobilefacenet.checkpointed = original


@pytest.mark.parametrize("network", ["r18", "mbf", "vit_t"])
def test_get_model_takes_the_option_for_every_family(network):
    with torch.device("meta"):
        assert get_model(network, activation_checkpointing=True).activation_checkpointing
