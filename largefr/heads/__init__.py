"""Classifier heads: the class-partitioned margin softmax (Partial FC) and its row-sparse optimizers."""
from largefr.heads.margins import MARGINS, Margin, build_margin, margin_logits, target_logit
from largefr.heads.optim import RowSparseAdamW, RowSparseSGD
from largefr.heads.sharded_head import ShardedMarginHead, normal_rows

__all__ = ["MARGINS", "Margin", "RowSparseAdamW", "RowSparseSGD", "ShardedMarginHead", "build_margin", "margin_logits",
           "normal_rows", "target_logit"]
