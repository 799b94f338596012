"""Vision Transformers for face crops, state_dict-compatible with insightface's arcface_torch `vit_*`.

The architecture of `recognition/arcface_torch/backbones/vit.py` (read at insightface commit
5ef98047542b18d911cef1e10c6c02273c4adff3, unchanged up to 7fadd420c2351d0ffa8cac403421c1a3ed733365):
9 x 9 patches without a class token (112 px -> a 12 x 12 grid of 144 tokens; the last 4 pixel rows and
columns are never seen, as upstream), a learned position embedding, pre-norm blocks (LayerNorm,
8-head self-attention with a bias-free qkv projection, LayerNorm, MLP 4x wide with ReLU6), a final
LayerNorm, and the `feature` head: flatten all tokens -> bias-free linear to the width -> BatchNorm1d
-> bias-free linear to the embedding -> BatchNorm1d (eps 2e-5). Module names (patch_embed.proj,
pos_embed, blocks.N.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm, feature.0-3, mask_token) are
upstream's, so a `backbone.pth` trained there loads with `strict=True`.

Training-time regularisation, as upstream: stochastic depth (drop path, rate rising linearly from 0 in
the first block to `drop_path_rate` in the last) and patch masking (a random `mask_ratio` of the tokens
is dropped before the blocks; after the final LayerNorm the learned `mask_token` fills their places).
Both are off in eval mode, so embeddings of a loaded model do not depend on them.

Precision: the attention scores and softmax run in float32 whatever the parameters' dtype (upstream
turns autocast off around them), the rest in the dtype DeepSpeed/autocast gives; the feature head's
BatchNorms keep float32 statistics (largefr/models/norm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from largefr.models.norm import BatchNorm1d
from largefr.models.recompute import checkpointed

PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
FEATURE_BN_EPS = 2e-5
INIT_STD = 0.02  # truncated normal of every Linear weight and of pos_embed; normal of mask_token


@dataclass(frozen=True, kw_only=True)
class ViTSpec:
    """Width and depth of a ViT size, and the regularisation its arcface_torch config trains with."""

    width: int
    """Token dimension (upstream `embed_dim`)."""
    depth: int
    """Number of transformer blocks."""
    drop_path_rate: float
    """Stochastic-depth rate of the last block."""
    mask_ratio: float
    """Fraction of patch tokens dropped in training."""


# The sizes of arcface_torch's shipped WebFace42M configs (configs/wf42m_pfc03_40epoch_*_vit_{t,s,b,l}.py),
# which train get_model's 'vit_t_dp005_mask0', 'vit_s_dp005_mask_0', 'vit_b_dp005_mask_005' and
# 'vit_l_dp005_mask_005'. (Its plain 'vit_t'/'vit_s'/'vit_b' names, used by no shipped config, have the
# same weights with drop path 0.1 and mask ratio 0.1: model.drop_path_rate / model.mask_ratio.)
VIT_SPECS: dict[str, ViTSpec] = {
    "vit_t": ViTSpec(width=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_s": ViTSpec(width=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_b": ViTSpec(width=512, depth=24, drop_path_rate=0.05, mask_ratio=0.05),
    "vit_l": ViTSpec(width=768, depth=24, drop_path_rate=0.05, mask_ratio=0.05),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability `rate`, scale the rest."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention; the scores, softmax and weighted sum in float32."""

    def __init__(self, width: int, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)  # each B x heads x tokens x head_dim
        mixed = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width).to(x.dtype))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch drop-pathed."""

    def __init__(self, width: int, *, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)  # registered in upstream's order, so state_dict keys list alike
        self.norm2 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(width, MLP_RATIO * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping PATCH_SIZE x PATCH_SIZE patches -> tokens (B x grid^2 x width), row-major."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT for square face crops; returns the raw (unnormalized) embedding, B x embedding_size."""

    def __init__(self, *, width: int, depth: int, embedding_size: int = 512, image_size: int = 112,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.0,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        _check_vit_args(embedding_size, image_size, drop_path_rate, mask_ratio)
        self.image_size = image_size  # input side in pixels (evaluation tools read it)
        self.num_patches = (image_size // PATCH_SIZE) ** 2
        self.mask_ratio = mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(width, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(width * self.num_patches, width, bias=False),
            BatchNorm1d(width, eps=FEATURE_BN_EPS),
            nn.Linear(width, embedding_size, bias=False),
            BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.normal_(self.mask_token, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.image_size, self.image_size):  # ONNX export traces
            raise ValueError(f"this ViT takes {self.image_size} x {self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x) + self.pos_embed
        restore = None
        if self.training and self.mask_ratio > 0:
            tokens, restore = self._drop_random_patches(tokens)
        for block in self.blocks:
            recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            tokens = checkpointed(block, tokens) if recompute else block(tokens)
        tokens = self.norm(tokens)
        if restore is not None:
            tokens = self._fill_dropped_patches(tokens, restore)
        return self.feature(tokens.flatten(1))

    def _drop_random_patches(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the kept tokens in a random order per sample, the permutation that puts every token back)."""
        batch, count, width = tokens.shape
        kept = int(count * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(batch, count, device=tokens.device), dim=1)
        restore = torch.argsort(order, dim=1)
        index = order[:, :kept].unsqueeze(-1).expand(-1, -1, width)
        return torch.gather(tokens, 1, index), restore

    def _fill_dropped_patches(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """mask_token in the dropped places, every token back in its patch's position."""
        batch, kept, width = tokens.shape
        filler = self.mask_token.to(tokens.dtype).expand(batch, restore.shape[1] - kept, width)
        shuffled = torch.cat([tokens, filler], dim=1)
        return torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, width))


def _check_vit_args(embedding_size: int, image_size: int, drop_path_rate: float, mask_ratio: float) -> None:
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
    if image_size < PATCH_SIZE:
        raise ValueError(f"image_size must be >= the ViT's patch size {PATCH_SIZE}, got {image_size}; "
                         "arcface_torch's ViTs take 112")
    for name, value in (("drop_path_rate", drop_path_rate), ("mask_ratio", mask_ratio)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def build_vit(name: str, *, dropout: float = 0.0, drop_path_rate: float | None = None,
              mask_ratio: float | None = None, **kwargs) -> VisionTransformer:
    """ViT by arcface_torch size name ('vit_t', 'vit_s', 'vit_b', 'vit_l'); None rates take the size's own."""
    if name not in VIT_SPECS:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VIT_SPECS)}")
    if dropout:
        raise ValueError(f"{name!r} has no dropout layer (arcface_torch's ViTs use drop path and patch masking); "
                         "set model.dropout to 0")
    spec = VIT_SPECS[name]
    return VisionTransformer(
        width=spec.width, depth=spec.depth,
        drop_path_rate=spec.drop_path_rate if drop_path_rate is None else drop_path_rate,
        mask_ratio=spec.mask_ratio if mask_ratio is None else mask_ratio, **kwargs)
