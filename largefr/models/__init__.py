"""Face backbones with insightface arcface_torch state_dict names; no torch.distributed here."""
from __future__ import annotations

import torch
from torch import nn

from largefr.models.iresnet import IRESNET_LAYERS, IResNet, build_iresnet
from largefr.models.mobilefacenet import (
    MOBILEFACENET_SPECS,
    MobileFaceNet,
    build_mobilefacenet,
)
from largefr.models.vit import VIT_SPECS, Attention, VisionTransformer, build_vit

NETWORK_NAMES: tuple[str, ...] = (*IRESNET_LAYERS, *MOBILEFACENET_SPECS, *VIT_SPECS)
# Family of each network name, and the options beyond embedding_size/dropout that each family accepts.
_FAMILIES = {**dict.fromkeys(IRESNET_LAYERS, "iresnet"), **dict.fromkeys(MOBILEFACENET_SPECS, "mobilefacenet"),
             **dict.fromkeys(VIT_SPECS, "vit")}
_BUILDERS = {"iresnet": build_iresnet, "mobilefacenet": build_mobilefacenet, "vit": build_vit}
_EXTRA_OPTIONS = {
    "iresnet": ("zero_init_residual", "image_size", "activation_checkpointing"),
    "mobilefacenet": ("image_size", "activation_checkpointing"),
    "vit": ("image_size", "activation_checkpointing", "drop_path_rate", "mask_ratio"),
}

__all__ = [
    "NETWORK_NAMES",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
    "count_forward_flops",
    "count_parameters",
    "get_model",
    "model_flops",
]


def get_model(name: str, *, embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> nn.Module:
    """Backbone by insightface name ('r18'..'r200', 'mbf', 'mbf_large', 'vit_t', 'vit_s', 'vit_b', 'vit_l').

    Returns a module mapping B x 3 x S x S images to raw B x embedding_size embeddings.
    """
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; valid choices: {', '.join(NETWORK_NAMES)}")
    family = _FAMILIES[name]
    unknown = sorted(set(kwargs) - set(_EXTRA_OPTIONS[family]))
    if unknown:
        hint = " (precision is set by DeepSpeed/autocast, not the model)" if "fp16" in unknown else ""
        raise ValueError(
            f"network {name!r} does not take {unknown}{hint}; options: embedding_size, dropout, "
            f"{', '.join(_EXTRA_OPTIONS[family])}"
        )
    return _BUILDERS[family](name, embedding_size=embedding_size, dropout=dropout, **kwargs)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_forward_flops(model: nn.Module, image_size: int = 112) -> int:
    """Forward FLOPs for one 3 x image_size x image_size image, counted as 2 x multiply-adds.

    Conv2d and Linear layers are counted, and a ViT attention's two token-by-token products (q k^T and
    the weighted sum of v: 2 x tokens^2 x width multiply-adds, ~9% of a vit_t); that is the matmul work
    MFU is defined on. Normalization, activations and residual adds are well under 1% of an IResNet and
    are left out. Runs one forward
    pass on a zero image placed like the model's weights; build the model on the "meta" device (as
    `model_flops` does) to count without arithmetic or memory.
    """
    multiply_adds = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal multiply_adds
        per_image_outputs = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            multiply_adds += per_image_outputs * (module.in_channels // module.groups) * kernel_h * kernel_w
        elif isinstance(module, Attention):
            tokens, width = inputs[0].shape[1:]
            multiply_adds += 2 * tokens * tokens * width
        else:
            multiply_adds += per_image_outputs * module.in_features

    counted = (nn.Conv2d, nn.Linear, Attention)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    try:
        model.eval()  # BatchNorm1d refuses a batch of one in training mode
        reference = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=reference.device, dtype=reference.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return 2 * multiply_adds


def model_flops(name: str, image_size: int = 112, *, embedding_size: int = 512) -> int:
    """Forward FLOPs per image of network `name` (2 x multiply-adds), for MFU; allocates no weights."""
    with torch.device("meta"):
        model = get_model(name, embedding_size=embedding_size, image_size=image_size)
    return count_forward_flops(model, image_size)
