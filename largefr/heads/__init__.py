"""Classifier heads: the class-partitioned margin softmax (Partial FC) and its row-sparse optimizers."""
from largefr.heads.margin import MarginConfig, margin_logits, target_logit
from largefr.heads.optim import RowSparseAdamW, RowSparseSGD
from largefr.heads.sharded_head import ShardedMarginHead, normal_rows

__all__ = ["MarginConfig", "RowSparseAdamW", "RowSparseSGD", "ShardedMarginHead", "margin_logits",
           "normal_rows", "target_logit"]
