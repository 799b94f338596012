"""The margins of the sharded head, one class per head.type (the protocol: `largefr.heads.margins.base`).

Every module of this folder is imported here, so a `Margin` subclass that names itself
(`class MyFace(Margin, name="myface")`) is in `MARGINS` without a list to edit; `build_margin` makes
the one the head section asks for. The head.type names, the margin's fields and their value rules are
declared by the config (largefr/choices.py, largefr/config.py HeadConfig, largefr/config_validation.py).
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import (NORM_EPS, REGISTRY, SIN_FLOOR, LogitsDerivative, Margin, MarginBatch,
                                        MarginStep, NegativeModulation)
from largefr.heads.margins.fixed import FixedMargin, combined_form, margin_logits, target_logit

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

MARGINS: dict[str, type[Margin]] = dict(sorted(REGISTRY.items()))
"""head.type -> the Margin class that implements it."""


def build_margin(config: HeadConfig, *, seed: int = 0, device: torch.device | str | None = None) -> Margin:
    """The margin of `config.type` (seed: of its random draws, e.g. ElasticFace's; the same on every rank)."""
    margin = MARGINS.get(config.type)
    if margin is None:
        raise ValueError(f"head.type {config.type!r} has no Margin class; the classes in largefr/heads/margins/ "
                         f"implement {sorted(MARGINS)}")
    return margin(config, seed=seed, device=device)


__all__ = ["MARGINS", "NORM_EPS", "SIN_FLOOR", "FixedMargin", "LogitsDerivative", "Margin", "MarginBatch", "MarginStep",
           "NegativeModulation", "build_margin", "combined_form", "margin_logits", "target_logit"]
