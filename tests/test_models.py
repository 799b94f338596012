"""Backbones: sizes, insightface state_dict names, forward semantics, FLOPs, and no torch.distributed."""
import ast
import pathlib
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import largefr.models
from largefr.config import ModelConfig
from largefr.models import (
    NETWORK_NAMES,
    count_forward_flops,
    count_parameters,
    get_model,
    model_flops,
)
from largefr.models.iresnet import IRESNET_LAYERS, IResNet

SMALL = ("r18", "mbf")


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return get_model(name, **kwargs)


def randomize_for_eval(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affines and PReLU slopes, so an eval forward exercises every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() * 0.5 + 0.5)
            elif tensor.dim() == 1:
                tensor.copy_(noise * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


# ---------------------------------------------------------------- sizes and shapes

@pytest.mark.parametrize("name, expected_millions", [("r100", 65.2), ("r50", 43.6)])
def test_parameter_count_matches_insightface(name, expected_millions):
    assert abs(count_parameters(meta_model(name)) / 1e6 - expected_millions) <= 0.2


def test_real_r100_builds_with_same_count_as_meta():
    assert count_parameters(get_model("r100")) == count_parameters(meta_model("r100"))


def test_embedding_scale_is_frozen_like_insightface():
    model = meta_model("r50")
    assert not model.features.weight.requires_grad
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 512


def test_the_config_offers_exactly_the_networks_get_model_builds():
    """model.network's choices (the config stays torch-free) are the registry's names, in its order."""
    assert typing.get_args(typing.get_type_hints(ModelConfig)["network"]) == NETWORK_NAMES


@pytest.mark.parametrize("name", NETWORK_NAMES)
@pytest.mark.parametrize("embedding_size", [512, 128])
def test_output_shape(name, embedding_size):
    if name in SMALL:
        model, images = get_model(name, embedding_size=embedding_size), torch.randn(2, 3, 112, 112)
    else:  # shape inference only: no weights allocated, no arithmetic done
        model, images = meta_model(name, embedding_size=embedding_size), torch.empty(2, 3, 112, 112, device="meta")
    out = model(images)
    assert out.shape == (2, embedding_size)
    if name in SMALL:
        assert torch.isfinite(out).all()
        assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # raw embedding, not normalized


@pytest.mark.parametrize("name", SMALL)
def test_smaller_images_supported(name):
    assert get_model(name, image_size=32, embedding_size=64)(torch.randn(2, 3, 32, 32)).shape == (2, 64)


# ---------------------------------------------------------------- insightface key names

# Verified against deepinsight/insightface recognition/arcface_torch/backbones/iresnet.py (r50, 512-d).
R50_KEYS = {
    "conv1.weight": (64, 3, 3, 3),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.bn2.bias": (64,),
    "layer1.0.prelu.weight": (64,),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.bn3.running_var": (64,),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1),
    "layer1.0.downsample.1.weight": (64,),
    "layer1.2.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer3.13.bn3.weight": (256,),
    "layer4.0.downsample.1.running_mean": (512,),
    "layer4.2.prelu.weight": (512,),
    "bn2.weight": (512,),
    "fc.weight": (512, 512 * 7 * 7),
    "fc.bias": (512,),
    "features.weight": (512,),
    "features.running_var": (512,),
}
R50_ABSENT = ["layer1.1.downsample.0.weight", "layer3.14.bn1.weight", "layer5.0.bn1.weight", "fc1.weight"]

# Verified against insightface's backbones/mobilefacenet.py (get_mbf, 512-d): stem, grouped stage 1
# (groups=64 on 128 channels), DepthWise(hidden=128), Residual blocks, conv_sep and the GDC head.
MBF_KEYS = {
    "layers.0.layers.0.weight": (128, 3, 3, 3),
    "layers.0.layers.1.running_mean": (128,),
    "layers.0.layers.2.weight": (128,),
    "layers.1.layers.0.weight": (128, 2, 3, 3),
    "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
    "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),
    "layers.2.layers.2.layers.1.weight": (128,),
    "layers.3.layers.3.layers.1.layers.2.weight": (128,),
    "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
    "layers.4.layers.2.layers.0.weight": (256, 256, 1, 1),
    "layers.5.layers.5.layers.2.layers.1.bias": (256,),
    "layers.6.layers.1.layers.0.weight": (512, 1, 3, 3),
    "layers.7.layers.1.layers.0.layers.0.weight": (256, 256, 1, 1),
    "conv_sep.layers.0.weight": (512, 256, 1, 1),
    "conv_sep.layers.2.weight": (512,),
    "features.layers.0.layers.0.weight": (512, 1, 7, 7),
    "features.layers.0.layers.1.running_var": (512,),
    "features.layers.2.weight": (512, 512),
    "features.layers.3.weight": (512,),
    "features.layers.3.running_mean": (512,),
}
MBF_ABSENT = ["features.layers.2.bias", "layers.8.layers.0.weight", "layers.3.layers.4.layers.0.layers.0.weight"]


@pytest.mark.parametrize("name, expected, absent", [("r50", R50_KEYS, R50_ABSENT), ("mbf", MBF_KEYS, MBF_ABSENT)])
def test_state_dict_keys_match_insightface(name, expected, absent):
    state = meta_model(name).state_dict()
    assert {key: tuple(state[key].shape) for key in expected if key in state} == expected
    assert not set(absent) & set(state)


@pytest.mark.parametrize("name", list(IRESNET_LAYERS))
def test_iresnet_key_count(name):
    # Stem 7 (conv, 5 BN entries, prelu); per block 18 (3 BNs x 5, 2 convs, prelu); per stage one
    # downsample 6 (conv + BN); head 12 (bn2 5, fc 2, features 5).
    expected = 7 + 18 * sum(IRESNET_LAYERS[name]) + 6 * 4 + 12
    assert len(meta_model(name).state_dict()) == expected


def test_mbf_key_count():
    # Per ConvBlock 7 (conv, 5 BN, prelu), LinearBlock 6, DepthWise 7+7+6 = 20. mbf: stem + stage-1
    # ConvBlock + 3 downsampling DepthWise + (4+6+2) residual DepthWise + conv_sep + GDC (6 + linear 1 + BN 5).
    expected = 7 + 7 + 3 * 20 + 12 * 20 + 7 + 12
    assert len(meta_model("mbf").state_dict()) == expected


# ---------------------------------------------------------------- forward semantics (plain reference)

def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training=False, eps=1e-5)


def _conv(x, weight, stride=1, padding=None):
    groups = x.shape[1] // weight.shape[1]
    padding = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)


def reference_iresnet(sd, layers, x):
    """insightface's IResNet forward, written from the state dict: stride 2 on conv2 of each stage's first block."""
    x = F.prelu(_bn(_conv(x, sd["conv1.weight"]), sd, "bn1"), sd["prelu.weight"])
    for stage, num_blocks in enumerate(layers, start=1):
        for block in range(num_blocks):
            p, stride = f"layer{stage}.{block}", 2 if block == 0 else 1
            out = _conv(_bn(x, sd, f"{p}.bn1"), sd[f"{p}.conv1.weight"])
            out = F.prelu(_bn(out, sd, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = _bn(_conv(out, sd[f"{p}.conv2.weight"], stride), sd, f"{p}.bn3")
            shortcut = x
            if block == 0:
                shortcut = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
            x = out + shortcut
    x = torch.flatten(_bn(x, sd, "bn2"), 1) @ sd["fc.weight"].T + sd["fc.bias"]
    return F.batch_norm(x, sd["features.running_mean"], sd["features.running_var"],
                        sd["features.weight"], sd["features.bias"], training=False, eps=1e-5)


def _conv_bn(x, sd, prefix, stride=1, padding=None, prelu=True):
    """insightface's ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN) at `prefix`."""
    x = _bn(_conv(x, sd[f"{prefix}.layers.0.weight"], stride, padding), sd, f"{prefix}.layers.1")
    return F.prelu(x, sd[f"{prefix}.layers.2.weight"]) if prelu else x


def _depthwise(x, sd, prefix, stride, residual):
    out = _conv_bn(x, sd, f"{prefix}.layers.0")
    out = _conv_bn(out, sd, f"{prefix}.layers.1", stride)
    out = _conv_bn(out, sd, f"{prefix}.layers.2", prelu=False)
    return out + x if residual else out


def reference_mbf(sd, blocks, x):
    """insightface's MobileFaceNet forward (blocks[0] == 1 variant), written from the state dict."""
    x = _conv_bn(x, sd, "layers.0", stride=2)
    x = _conv_bn(x, sd, "layers.1")
    for downsample_index in (2, 4, 6):
        x = _depthwise(x, sd, f"layers.{downsample_index}", stride=2, residual=False)
        for block in range(blocks[downsample_index // 2]):
            x = _depthwise(x, sd, f"layers.{downsample_index + 1}.layers.{block}", stride=1, residual=True)
    x = _conv_bn(x, sd, "conv_sep")
    x = torch.flatten(_conv_bn(x, sd, "features.layers.0", padding=0, prelu=False), 1)
    x = x @ sd["features.layers.2.weight"].T
    return F.batch_norm(x, sd["features.layers.3.running_mean"], sd["features.layers.3.running_var"],
                        sd["features.layers.3.weight"], sd["features.layers.3.bias"], training=False, eps=1e-5)


def test_iresnet_forward_matches_insightface_order():
    model = randomize_for_eval(get_model("r18"))
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_iresnet(model.state_dict(), IRESNET_LAYERS["r18"], images)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_mbf_forward_matches_insightface_order():
    model = randomize_for_eval(get_model("mbf"))
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_mbf(model.state_dict(), (1, 4, 6, 2), images)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_with_bf16_parameters_keeps_fp32_statistics(momentum):
    from largefr.models.norm import BatchNorm2d

    reference = nn.BatchNorm2d(3, momentum=momentum)
    layer = BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0]).bfloat16().float())
        reference.bias.copy_(torch.tensor([0.25, -1.0, 0.0]))
    layer.load_state_dict(reference.state_dict())
    for parameter in layer.parameters():  # what a bf16 DeepSpeed engine does: parameters only
        parameter.data = parameter.data.bfloat16()
    for step in range(3):
        images = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(step)).bfloat16()
        expected, got = reference(images.float()), layer(images)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    assert layer.running_var.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == 3
    got.float().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and torch.isfinite(layer.weight.grad.float()).all()
    layer.eval()
    torch.testing.assert_close(layer(images).float(), reference.eval()(images.float()), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- checkpoints and options

@pytest.mark.parametrize("name", SMALL)
def test_save_load_round_trip_strict(name, tmp_path):
    source = randomize_for_eval(get_model(name), seed=3)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    target = get_model(name).eval()
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


def test_loading_a_different_network_fails_strict():
    with pytest.raises(RuntimeError, match="Missing key"):
        meta_model("r100").load_state_dict(meta_model("r50").state_dict(), strict=True, assign=True)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(4)
    plain = IResNet(layers=(2, 1, 1, 1), image_size=16, embedding_size=8)
    checkpointed = IResNet(layers=(2, 1, 1, 1), image_size=16, embedding_size=8, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 16, 16)
    for model in (plain, checkpointed):
        model(images).square().sum().backward()
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=key)


def test_zero_init_residual_makes_blocks_identity():
    model = get_model("r18", image_size=32, zero_init_residual=True).eval()
    block = model.layer2[1]  # no downsample: output must equal input
    assert torch.count_nonzero(block.bn3.weight) == 0
    features = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(features), features)
    assert torch.count_nonzero(get_model("r18", image_size=32).layer2[1].bn3.weight) > 0


def test_insightface_conv_init_std():
    weights = torch.cat([m.weight.flatten() for m in get_model("r18").modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.1) < 0.005
    assert abs(weights.mean().item()) < 0.005


# ---------------------------------------------------------------- errors

def test_unknown_network_names_valid_choices():
    with pytest.raises(ValueError, match=r"unknown network 'r101'.*r18, r34, r50, r100, r200, mbf"):
        get_model("r101")


def test_fp16_option_refused_with_hint():
    with pytest.raises(ValueError, match=r"does not take \['fp16'\].*DeepSpeed/autocast"):
        get_model("r18", fp16=True)


def test_mbf_refuses_dropout():
    with pytest.raises(ValueError, match="'mbf' has no dropout layer"):
        get_model("mbf", dropout=0.4)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 100}, "multiple of 16"),
    ({"embedding_size": 0}, "embedding_size must be >= 1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        meta_model("r18", **kwargs)


# ---------------------------------------------------------------- FLOPs

def test_flops_hand_count_on_tiny_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 out, 8 ch, 3*3*3 MACs each: 64*8*27 = 13824
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # 4x4 out, 8 ch, 1*3*3 each: 16*8*9 = 1152
        nn.Flatten(),
        nn.Linear(128, 10),  # 1280
    )
    assert count_forward_flops(net, image_size=8) == 2 * (13824 + 1152 + 1280)
    assert net.training  # mode restored


def test_iresnet_flops_match_analytic_count():
    side, in_channels, macs = 112, 64, 112 * 112 * 64 * 3 * 9  # stem conv
    for num_blocks, width in zip(IRESNET_LAYERS["r50"], (64, 128, 256, 512)):
        out_side = side // 2
        macs += side * side * width * in_channels * 9  # first block conv1 (stride 1, input size)
        macs += out_side * out_side * width * width * 9  # first block conv2 (stride 2)
        macs += out_side * out_side * width * in_channels  # 1x1 downsample
        macs += (num_blocks - 1) * 2 * out_side * out_side * width * width * 9
        side, in_channels = out_side, width
    macs += 512 * 7 * 7 * 512  # fc
    assert model_flops("r50") == 2 * macs
    # insightface lists r100 at about 12.1 G multiply-adds (24.2 GFLOPs) per 112x112 image.
    assert model_flops("r100") == pytest.approx(24.2e9, rel=0.01)


# ---------------------------------------------------------------- layering

def _uses_distributed(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.startswith("torch.distributed") for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        return module.startswith("torch.distributed") or (
            module == "torch" and any(alias.name == "distributed" for alias in node.names)
        )
    return isinstance(node, ast.Attribute) and node.attr == "distributed"


def _distributed_uses(tree: ast.AST) -> list[int]:
    """Line numbers of any import of, or attribute access to, torch.distributed (docstrings don't count)."""
    return sorted(node.lineno for node in ast.walk(tree) if _uses_distributed(node))


def test_distributed_use_detector_can_fail():
    source = "import torch.distributed as dist\nfrom torch import distributed\nx = torch.distributed.get_rank()\n"
    assert _distributed_uses(ast.parse(source)) == [1, 2, 3]


def test_models_never_import_torch_distributed():
    files = list(pathlib.Path(largefr.models.__file__).parent.rglob("*.py"))
    assert len(files) >= 3
    for path in files:
        assert _distributed_uses(ast.parse(path.read_text())) == [], path
