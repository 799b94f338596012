"""BatchNorm layers that keep float32 running statistics under bf16/fp16 parameters.

DeepSpeed 0.19.8 casts a bf16/fp16 engine's parameters only (`DeepSpeedEngine._cast_module_mixed_precision`):
buffers keep the dtype they were built in unless `data_types.buffer_dtype` is set. torch's batch_norm
refuses bf16 weights beside float32 running statistics ("expected scalar type BFloat16 but found Float"
on CPU); it accepts a low-precision input with float32 weights and statistics (its mixed-type kernel, the
one autocast training uses). So when the parameters were cast below the statistics' dtype, these layers
hand batch_norm their weight and bias in the statistics' dtype: the output stays in the input's dtype, the
running statistics keep float32 resolution, the weight's gradient flows back in the parameter's dtype.
Module and state_dict names are nn.BatchNorm's, so insightface checkpoints still load.
While activation checkpointing recomputes a block (largefr/models/recompute.py) they normalize with the
batch's statistics without updating the running ones, which the first forward already did.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from largefr.models.recompute import recomputing


class _StatsDtypeBatchNorm(nn.modules.batchnorm._BatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        mixed = stats is not None and self.weight is not None and self.weight.dtype != stats.dtype
        recompute = self.training and recomputing()
        if not (mixed or recompute):
            return super().forward(x)
        self._check_input_dim(x)
        factor = self.momentum
        if self.training and self.track_running_stats and not recompute:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative moving average, as nn.BatchNorm does with momentum=None
                factor = 1.0 / float(self.num_batches_tracked)
        weight, bias = self.weight, self.bias
        if mixed:
            weight, bias = weight.to(stats.dtype), bias.to(stats.dtype)
        mean, var = stats, self.running_var
        if recompute and stats is not None:
            # the update lands on throwaway copies, so backward saves the same tensors as the first forward
            mean, var = stats.clone(), self.running_var.clone()
        return F.batch_norm(x, mean, var, weight, bias, self.training, 0.0 if factor is None else factor, self.eps)


class BatchNorm1d(_StatsDtypeBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d that runs with float32 statistics beside bf16/fp16 parameters."""


class BatchNorm2d(_StatsDtypeBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d that runs with float32 statistics beside bf16/fp16 parameters."""
