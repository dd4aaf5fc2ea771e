"""Small tensor helpers shared by every component."""

from __future__ import annotations

import torch
from monai.utils import LossReduction


def plain(x) -> torch.Tensor:
    """Drop MONAI metadata (``MetaTensor`` -> ``Tensor``) so arithmetic stays cheap; other inputs become tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a MONAI ``LossReduction`` ("mean", "sum" or "none") to ``x``."""
    reduction = LossReduction(reduction).value
    if reduction == LossReduction.MEAN.value:
        return x.mean()
    if reduction == LossReduction.SUM.value:
        return x.sum()
    return x
