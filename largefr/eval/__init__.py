"""Evaluation: verification, IJB-B/C, identification and search, clustering, embedding, export (docs/DESIGN.md)."""
from __future__ import annotations

from largefr.errors import UserError


class EvaluationError(UserError, ValueError):
    """Data or settings an evaluation cannot score (too few pairs for the folds, one kind of pair, k > N, ...)."""
