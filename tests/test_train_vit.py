"""vit_t trains in the real trainer (DeepSpeed engine, momentum encoder, sharded head): 3 steps at 32 px."""
from __future__ import annotations

import torch

from tests.distributed_helpers import run_distributed
from tests.test_compile import _train


def test_vit_t_trains_three_steps_with_checkpointing_and_masking(tmp_path):
    # 32 px gives a 3 x 3 patch grid; ZeRO 1 with patch masking on (mask_token gets gradients) and with
    # activation checkpointing (drop path inside the recomputed blocks)
    result, = run_distributed(_train, 1, {
        "output": str(tmp_path / "run"),
        "model": {"network": "vit_t", "embedding_size": 16, "activation_checkpointing": True, "mask_ratio": 0.2},
    })
    losses = torch.tensor(result["losses"])
    assert len(losses) == 3 and torch.isfinite(losses).all()
    assert result["warnings"] == []
