"""MobileFaceNet, state_dict-compatible with insightface's arcface_torch `mbf` and `mbf_large`.

Every building block keeps its modules in an `nn.Sequential` named `layers` and the network keeps
its stages in an `nn.ModuleList` named `layers`, followed by `conv_sep` and the `features` head
(global depthwise conv, flatten, bias-free linear, BatchNorm1d), exactly as upstream, so keys such as
`layers.3.layers.0.layers.1.layers.0.weight` line up with a `backbone.pth` trained there.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from largefr.models.iresnet import DOWNSAMPLE_FACTOR, check_backbone_args
from largefr.models.norm import BatchNorm1d, BatchNorm2d
from largefr.models.recompute import checkpointed


def _conv(in_c: int, out_c: int, kernel: int, stride: int, groups: int, padding: int | None = None) -> nn.Conv2d:
    padding = kernel // 2 if padding is None else padding
    return nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False)


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, *, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(_conv(in_c, out_c, kernel, stride, groups), BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv -> BN, no activation (the projection of an inverted bottleneck)."""

    def __init__(self, in_c: int, out_c: int, *, kernel: int = 1, stride: int = 1, groups: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(_conv(in_c, out_c, kernel, stride, groups, padding), BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden` -> depthwise 3x3(stride) -> 1x1 project, optional residual.

    Upstream calls `hidden` "groups"; it is both the expanded width and the depthwise group count.
    """

    def __init__(self, in_c: int, out_c: int, *, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        if residual and (stride != 1 or in_c != out_c):
            raise ValueError("a residual DepthWise block needs stride 1 and in_c == out_c")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """`num_blocks` shape-preserving residual DepthWise blocks."""

    def __init__(self, channels: int, *, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden=hidden, stride=1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the final map, then linear embedding and BatchNorm1d."""

    def __init__(self, channels: int, side: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=side, groups=channels, padding=0),
            nn.Flatten(),  # no parameters, but it keeps the linear layer at index 2 as upstream
            nn.Linear(channels, embedding_size, bias=False),
            BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True, kw_only=True)
class MobileFaceNetSpec:
    """Depth and width of a MobileFaceNet variant."""

    blocks: tuple[int, int, int, int]
    """Residual blocks in the four stages (stage 1 with a single block is a plain grouped conv)."""
    scale: int
    """Width multiplier: stages are 64*scale and 128*scale channels wide."""


MOBILEFACENET_SPECS: dict[str, MobileFaceNetSpec] = {
    "mbf": MobileFaceNetSpec(blocks=(1, 4, 6, 2), scale=2),
    "mbf_large": MobileFaceNetSpec(blocks=(2, 8, 12, 4), scale=4),
}
GDC_CHANNELS = 512


class MobileFaceNet(nn.Module):
    """MobileFaceNet for square face crops; returns the raw (unnormalized) embedding, B x embedding_size."""

    def __init__(self, *, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2, embedding_size: int = 512,
                 image_size: int = 112, activation_checkpointing: bool = False) -> None:
        super().__init__()
        check_backbone_args(embedding_size, image_size)
        self.image_size = image_size  # input side in pixels (evaluation tools read it)
        if len(blocks) != 4 or any(n < 1 for n in blocks) or scale < 1:
            raise ValueError(f"blocks must be 4 positive counts and scale >= 1, got {list(blocks)}, {scale}")
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(_stages(blocks, scale))
        self.conv_sep = ConvBlock(128 * scale, GDC_CHANNELS)
        self.features = GDC(GDC_CHANNELS, image_size // DOWNSAMPLE_FACTOR, embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            for unit in self._checkpoint_units():  # recompute each unit in backward instead of storing it
                x = checkpointed(unit, x)
        else:
            for stage in self.layers:
                x = stage(x)
        return self.features(self.conv_sep(x))

    def _checkpoint_units(self) -> list[nn.Module]:
        """The stages in order, a Residual stage split into its blocks (one recomputed at a time)."""
        units: list[nn.Module] = []
        for stage in self.layers:
            units.extend(stage.layers if isinstance(stage, Residual) else [stage])
        return units


def _stages(blocks: Sequence[int], scale: int) -> list[nn.Module]:
    """The eight entries of `layers`; the hidden widths (128/256/512) are upstream's, independent of scale."""
    narrow, wide = 64 * scale, 128 * scale
    if blocks[0] == 1:
        # Upstream uses 64 groups here whatever the width (grouped, not fully depthwise, for scale > 1).
        stage1: nn.Module = ConvBlock(narrow, narrow, kernel=3, groups=64)
    else:
        stage1 = Residual(narrow, num_blocks=blocks[0], hidden=128)
    return [
        ConvBlock(3, narrow, kernel=3, stride=2),
        stage1,
        DepthWise(narrow, narrow, hidden=128, stride=2, residual=False),
        Residual(narrow, num_blocks=blocks[1], hidden=128),
        DepthWise(narrow, wide, hidden=256, stride=2, residual=False),
        Residual(wide, num_blocks=blocks[2], hidden=256),
        DepthWise(wide, wide, hidden=512, stride=2, residual=False),
        Residual(wide, num_blocks=blocks[3], hidden=256),
    ]


def build_mobilefacenet(name: str, *, dropout: float = 0.0, **kwargs) -> MobileFaceNet:
    """MobileFaceNet by insightface name ('mbf', 'mbf_large')."""
    if name not in MOBILEFACENET_SPECS:
        raise ValueError(f"unknown MobileFaceNet {name!r}; choose one of {sorted(MOBILEFACENET_SPECS)}")
    if dropout:
        raise ValueError(f"{name!r} has no dropout layer (as in insightface); set model.dropout to 0")
    spec = MOBILEFACENET_SPECS[name]
    return MobileFaceNet(blocks=spec.blocks, scale=spec.scale, **kwargs)
