"""Improved ResNet (IResNet) face backbones, state_dict-compatible with insightface's arcface_torch.

Module and attribute names (conv1, bn1, prelu, layer1..layer4, bn2, dropout, fc, features and,
inside a block, bn1, conv1, bn2, prelu, conv2, bn3, downsample.0/.1) are the ones of
`recognition/arcface_torch/backbones/iresnet.py`, so a `backbone.pth` trained there loads here with
`strict=True`. Precision (bf16/fp16) is left to DeepSpeed/autocast outside the model; the
BatchNorm layers keep float32 running statistics beside bf16/fp16 parameters (largefr/models/norm.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from largefr.models.norm import BatchNorm1d, BatchNorm2d
from largefr.models.recompute import checkpointed

# Blocks per stage; every stage halves the spatial size (112 -> 56 -> 28 -> 14 -> 7).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
DOWNSAMPLE_FACTOR = 16  # four stride-2 stages
BN_EPS = 1e-5
CONV_INIT_STD = 0.1  # insightface initialises every conv with N(0, 0.1)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)  # the stride sits on the second conv, as upstream
        self.bn3 = BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return residual + shortcut


def check_backbone_args(embedding_size: int, image_size: int) -> None:
    """Arguments every backbone shares; the four stride-2 stages need a side divisible by 16."""
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
    if image_size < DOWNSAMPLE_FACTOR or image_size % DOWNSAMPLE_FACTOR:
        raise ValueError(
            f"image_size must be a positive multiple of {DOWNSAMPLE_FACTOR} (the backbone halves it four "
            f"times), got {image_size}; insightface data is 112"
        )


class IResNet(nn.Module):
    """IResNet for square face crops; returns the raw (unnormalized) embedding, B x embedding_size."""

    def __init__(
        self,
        *,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        image_size: int = 112,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_backbone_args(embedding_size, image_size)
        self.image_size = image_size  # input side in pixels (evaluation tools read it)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.activation_checkpointing = activation_checkpointing
        self.conv1 = _conv3x3(3, STEM_WIDTH)
        self.bn1 = BatchNorm2d(STEM_WIDTH, eps=BN_EPS)
        self.prelu = nn.PReLU(STEM_WIDTH)
        in_channels = STEM_WIDTH
        for index, (num_blocks, width) in enumerate(zip(layers, STAGE_WIDTHS), start=1):
            setattr(self, f"layer{index}", _make_stage(in_channels, width, num_blocks))
            in_channels = width
        self.bn2 = BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        final_side = image_size // DOWNSAMPLE_FACTOR
        self.fc = nn.Linear(in_channels * final_side * final_side, embedding_size)
        self.features = BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=CONV_INIT_STD)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # As upstream: the embedding BatchNorm's scale is fixed at 1 (only its shift learns), which keeps
        # the embedding's per-dimension scale from drifting; it is still saved in the state_dict.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            # Zero the last BN of each residual branch so every block starts as its shortcut (Goyal et al.).
            # insightface zeros bn2 instead; both make the branch output zero at step 0.
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn3.weight)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            x = self._run_stage(stage, x)
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:  # recompute each block in backward instead of storing its activations
            x = checkpointed(block, x)
        return x


def _make_stage(in_channels: int, width: int, num_blocks: int) -> nn.Sequential:
    """First block downsamples (stride 2, 1x1-conv shortcut); the rest keep the shape."""
    blocks = [IBasicBlock(in_channels, width, stride=2)]
    blocks += [IBasicBlock(width, width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def build_iresnet(name: str, **kwargs) -> IResNet:
    """IResNet by insightface name ('r18', 'r34', 'r50', 'r100', 'r200')."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; choose one of {sorted(IRESNET_LAYERS)}")
    return IResNet(layers=IRESNET_LAYERS[name], **kwargs)
