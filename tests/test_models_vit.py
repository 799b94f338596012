"""ViT backbones: arcface_torch's state_dict names and shapes, its forward, masking, drop path, sizes."""
import os
import pytest
import torch
import torch.nn.functional as F

from largefr.models import count_parameters, get_model, model_flops
from largefr.models.vit import VIT_SPECS, VisionTransformer
from tests.test_models import meta_model, randomize_for_eval

# From insightface recognition/arcface_torch/backbones/__init__.py and vit.py at commit
# 5ef98047542b18d911cef1e10c6c02273c4adff3 (vit.py unchanged at 7fadd420c2351d0ffa8cac403421c1a3ed733365):
# (embed_dim, depth) of get_model's 'vit_t_dp005_mask0', 'vit_s_dp005_mask_0', 'vit_b_dp005_mask_005',
# 'vit_l_dp005_mask_005' (the networks of configs/wf42m_pfc03_40epoch_*_vit_*.py); 8 heads, patch 9, img 112,
# drop_path_rate 0.05 everywhere, mask_ratio 0, 0, 0.05, 0.05.
UPSTREAM = {"vit_t": (256, 12, 0.05, 0.0), "vit_s": (512, 12, 0.05, 0.0), "vit_b": (512, 24, 0.05, 0.05),
            "vit_l": (768, 24, 0.05, 0.05)}
# insightface's README (arcface_torch, "ViT For Face Recognition"): GFLOPs (multiply-adds) per image.
README_GMACS = {"vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}


def upstream_keys(width: int, depth: int, embedding: int = 512, patches: int = 144) -> list[tuple[str, tuple]]:
    """Every state_dict entry of upstream's VisionTransformer, in its order: the root's own parameters
    (pos_embed, mask_token), then patch_embed, blocks (each: norm1, norm2, attn.qkv without bias, attn.proj,
    mlp.fc1, mlp.fc2), norm, and feature = Linear(no bias), BatchNorm1d, Linear(no bias), BatchNorm1d."""
    keys = [("pos_embed", (1, patches, width)), ("mask_token", (1, 1, width)),
            ("patch_embed.proj.weight", (width, 3, 9, 9)), ("patch_embed.proj.bias", (width,))]
    for index in range(depth):
        block = f"blocks.{index}."
        keys += [(block + "norm1.weight", (width,)), (block + "norm1.bias", (width,)),
                 (block + "norm2.weight", (width,)), (block + "norm2.bias", (width,)),
                 (block + "attn.qkv.weight", (3 * width, width)),
                 (block + "attn.proj.weight", (width, width)), (block + "attn.proj.bias", (width,)),
                 (block + "mlp.fc1.weight", (4 * width, width)), (block + "mlp.fc1.bias", (4 * width,)),
                 (block + "mlp.fc2.weight", (width, 4 * width)), (block + "mlp.fc2.bias", (width,))]
    keys += [("norm.weight", (width,)), ("norm.bias", (width,)), ("feature.0.weight", (width, width * patches))]
    keys += _batchnorm_keys("feature.1", width)
    keys += [("feature.2.weight", (embedding, width))]
    return keys + _batchnorm_keys("feature.3", embedding)


def _batchnorm_keys(prefix: str, width: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.{name}", (width,)) for name in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())]


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_state_dict_matches_arcface_torch_definition(name):
    width, depth, drop_path_rate, mask_ratio = UPSTREAM[name]
    model = meta_model(name)
    assert [(key, tuple(t.shape)) for key, t in model.state_dict().items()] == upstream_keys(width, depth)
    assert (model.mask_ratio, model.blocks[-1].drop_path.rate) == (mask_ratio, pytest.approx(drop_path_rate))
    assert model.blocks[0].drop_path.rate == 0.0  # linear rule from 0
    assert model_flops(name) / 2e9 == pytest.approx(README_GMACS[name], abs=0.06)


def test_embedding_size_and_small_side_change_only_their_shapes():
    state = meta_model("vit_t", embedding_size=128, image_size=32).state_dict()
    assert [(key, tuple(t.shape)) for key, t in state.items()] == upstream_keys(256, 12, 128, patches=9)


def reference_vit(sd, depth, x, heads=8):
    """arcface_torch's eval forward written from the state dict: explicit softmax attention, ReLU6 MLP."""
    width = sd["pos_embed"].shape[-1]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=9)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    batch, tokens, _ = x.shape
    for index in range(depth):
        p = f"blocks.{index}."
        h = F.layer_norm(x, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + h @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.layer_norm(x, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = F.relu6(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (width,), sd["norm.weight"], sd["norm.bias"]).reshape(batch, -1)
    for linear, norm in (("feature.0", "feature.1"), ("feature.2", "feature.3")):
        x = F.batch_norm(x @ sd[f"{linear}.weight"].T, sd[f"{norm}.running_mean"], sd[f"{norm}.running_var"],
                         sd[f"{norm}.weight"], sd[f"{norm}.bias"], training=False, eps=2e-5)
    return x


def test_forward_matches_arcface_torch():
    torch.manual_seed(0)
    # 58 px: a 6 x 6 grid that leaves 4 pixel rows and columns unseen, as 112 px does (12 x 12), 4x cheaper
    model = randomize_for_eval(get_model("vit_t", embedding_size=64, image_size=58))
    images = torch.randn(2, 3, 58, 58, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_vit(model.state_dict(), 12, images)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_state_dict_round_trip_strict(tmp_path):
    source = randomize_for_eval(get_model("vit_t", embedding_size=64, image_size=18), seed=5)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    target = get_model("vit_t", embedding_size=64, image_size=18).eval()
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    images = torch.randn(3, 3, 18, 18)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(width=16, depth=2, embedding_size=8, image_size=36, **kwargs)  # 4 x 4 patches


def test_masking_keeps_tokens_in_place_and_fills_the_rest_with_the_mask_token():
    model = tiny_vit(mask_ratio=0.3)
    tokens = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1).expand(2, 16, 16).contiguous()
    kept, restore = model._drop_random_patches(tokens)
    assert kept.shape == (2, int(16 * 0.7), 16)
    filled = model._fill_dropped_patches(kept, restore)
    is_mask = (filled == model.mask_token).all(dim=-1)
    assert is_mask.sum(dim=1).tolist() == [16 - 11, 16 - 11]
    assert torch.equal(filled[~is_mask], tokens[~is_mask])  # every kept token back at its own position
    assert not torch.equal(is_mask[0], is_mask[1])  # per-sample masks (fails with probability ~2e-4)


def test_training_regularisation_is_random_and_eval_is_deterministic():
    model = tiny_vit(mask_ratio=0.25, drop_path_rate=0.5)
    images = torch.randn(4, 3, 36, 36)
    first, second = model(images), model(images)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    from largefr.models.vit import DropPath

    torch.manual_seed(0)
    out = DropPath(0.25).train()(torch.ones(20000, 3, 2))
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))
    assert per_sample.unique().tolist() == pytest.approx([0.0, 4 / 3])
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.02)


def test_bf16_parameters_train_and_attention_runs_in_float32():
    model = tiny_vit().to(torch.bfloat16)
    images = torch.randn(2, 3, 36, 36, dtype=torch.bfloat16)
    out = model(images)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 8}, "image_size must be >= the ViT's patch size 9"),
    ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
    ({"drop_path_rate": -0.1}, r"drop_path_rate must be in \[0, 1\)"),
    ({"dropout": 0.1}, "'vit_t' has no dropout layer"),
    ({"zero_init_residual": True}, r"does not take \['zero_init_residual'\]"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        meta_model("vit_t", **kwargs)


def test_wrong_input_side_is_refused():
    with pytest.raises(ValueError, match="takes 32 x 32 images, got \\(112, 112\\)"):
        get_model("vit_t", image_size=32)(torch.zeros(1, 3, 112, 112))


def test_every_size_is_registered():
    assert set(VIT_SPECS) == set(UPSTREAM)
    assert count_parameters(meta_model("vit_t")) < count_parameters(meta_model("vit_s"))


ARCFACE_TORCH = os.environ.get("LARGEFR_ARCFACE_TORCH")


@pytest.mark.skipif(not ARCFACE_TORCH, reason="set LARGEFR_ARCFACE_TORCH to a checkout's recognition/arcface_torch "
                    "(its backbones/vit.py imports timm, which needs torchvision)")
@pytest.mark.parametrize("name", ["vit_t", "vit_b"])
def test_loads_and_embeds_in_insightface_own_vit(name, monkeypatch):
    """Our weights load strictly into insightface's own VisionTransformer and embed identically (eval)."""
    monkeypatch.syspath_prepend(ARCFACE_TORCH)
    upstream = pytest.importorskip("backbones.vit")
    width, depth, _, _ = UPSTREAM[name]
    ours = randomize_for_eval(get_model(name, embedding_size=512, image_size=112), seed=3)
    theirs = upstream.VisionTransformer(img_size=112, patch_size=9, num_classes=512, embed_dim=width, depth=depth,
                                        num_heads=8, drop_path_rate=0.05, norm_layer="ln", mask_ratio=0.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(x).float(), ours(x), atol=1e-4, rtol=1e-4)
