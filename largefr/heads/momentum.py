"""Momentum encoder: an exponential moving average of the backbone, run without gradients.

Design choices (documented here because they are not in the paper):
- BatchNorm mode follows the module's own train/eval flag, as in MoCo: during training the copy
  normalizes with the statistics of its own batch, which match the EMA weights' activations
  better than the backbone's running statistics do (the EMA weights lag the backbone by about
  1/(1-me) steps). The features only feed the detached queue, so MoCo's batch-statistics
  leakage concern does not apply here.
- `update` moves the parameters by the EMA rule and COPIES the buffers (BatchNorm running
  statistics, counters) from the backbone, so the copy in eval mode (export, inspection) uses
  sensible statistics. Running statistics the copy accumulates in train mode are overwritten
  at the next update.
- Storage precision: `dtype=None` keeps the backbone's; pass `torch.float32` for a bf16/fp16
  backbone, because with me = 0.999 the increment (1-me)*theta is below bf16 resolution and a
  bf16 EMA would barely move. The forward casts its input to the copy's floating dtype.
- ZeRO-3 partitions parameters (each rank holds a slice), so an EMA of the local tensors
  would be wrong: it is refused with a clear error until supported.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from largefr.stateful import EntryNote, ReplicatedModule

ZERO3_MESSAGE = (
    "MomentumEncoder needs full backbone parameters on every rank, but parameter '{name}' is "
    "partitioned ({why}); this happens with DeepSpeed ZeRO stage 3. Use zero_optimization.stage "
    "0, 1 or 2 for training with the momentum encoder."
)


def check_full_parameters(module: nn.Module) -> None:
    """Raise if any parameter of `module` is a ZeRO-3 partition rather than the full tensor."""
    for name, param in module.named_parameters():
        if hasattr(param, "ds_status") or hasattr(param, "ds_numel"):
            raise ValueError(ZERO3_MESSAGE.format(name=name, why="it carries DeepSpeed's ds_status/ds_numel"))
        if param.numel() == 0:
            raise ValueError(ZERO3_MESSAGE.format(name=name, why="it has no elements on this rank"))


class MomentumEncoder(ReplicatedModule, nn.Module):
    """EMA copy of a backbone: `theta_m <- me*theta_m + (1-me)*theta_f`, buffers copied.

    Forward returns L2-normalized embeddings (`normalize=False` for the raw ones) without
    building a graph.
    """

    CHECKPOINT_NAME = "momentum_encoder"
    CHECKPOINT_NOTE = EntryNote("the momentum encoder", "the cluster terms; its shapes model.network")

    def __init__(self, backbone: nn.Module, *, momentum: float = 0.999, dtype: torch.dtype | None = None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum encoder momentum must be in [0, 1], got {momentum}")
        check_full_parameters(backbone)
        self.momentum = momentum
        self.encoder = copy.deepcopy(backbone)
        if dtype is not None:
            self.encoder.to(dtype=dtype)
        self.encoder.requires_grad_(False)

    def _pairs(self, backbone: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        own = list(self.encoder.parameters())
        source = list(backbone.parameters())
        if len(own) != len(source) or any(a.shape != b.shape for a, b in zip(own, source)):
            raise ValueError(
                "MomentumEncoder.update: the backbone's parameters do not match the copy's "
                f"({len(source)} vs {len(own)} tensors or different shapes); pass the same backbone "
                "architecture that the encoder was built from (engine.module under DeepSpeed)"
            )
        return own, source

    @torch.no_grad()
    def update(self, backbone: nn.Module, momentum: float | None = None) -> None:
        """EMA step from `backbone`'s current parameters; call after each optimizer step."""
        check_full_parameters(backbone)
        me = self.momentum if momentum is None else momentum
        own, source = self._pairs(backbone)
        source = [s.detach().to(o.dtype) for o, s in zip(own, source)]
        torch._foreach_mul_(own, me)
        torch._foreach_add_(own, source, alpha=1.0 - me)
        own_buffers = list(self.encoder.buffers())
        source_buffers = list(backbone.buffers())
        if len(own_buffers) != len(source_buffers):
            raise ValueError(
                f"MomentumEncoder.update: backbone has {len(source_buffers)} buffers, the copy "
                f"{len(own_buffers)}; pass the backbone the encoder was built from"
            )
        for mine, theirs in zip(own_buffers, source_buffers):
            mine.copy_(theirs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        first = next(self.encoder.parameters(), None)
        if first is not None and images.is_floating_point():
            images = images.to(first.dtype)
        embeddings = self.encoder(images)
        return F.normalize(embeddings, dim=1) if normalize else embeddings

