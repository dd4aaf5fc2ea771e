"""Padding outside a scanner's field of view: the constant a CBCT (or a cropped reconstruction) writes where it saw
nothing.

A cone-beam CT reconstructs a cylinder; the voxels outside it hold one value (e.g. -1000 HU or 0), exactly, however
noisy the scan is inside. Registered as image content, the border of that cylinder is a strong edge that does not
move with the anatomy. :func:`padding_value` finds such padding (the image's lowest value, held exactly by a sizeable
share of the voxels); where it finds it in the fixed image, ``register`` (``--fov_value auto``) hands its value to
:class:`custom.iterative.IterativeSegReg` as ``fov_value``: regions mostly outside the field of view are registered
by their masks alone. Noisy air around a body or an MR background with noise is not padding: its lowest value is held
by a few voxels only.
"""

from __future__ import annotations

import torch

# share of the voxels that must hold the lowest value exactly: a real cone-beam field of view leaves tens of percent
# outside it, noisy air a handful of voxels
MIN_PADDING_FRACTION = 0.02


def padding_fraction(image: torch.Tensor) -> tuple[float, float]:
    """``(lowest value, share of the voxels that hold it exactly)`` of ``image`` (any shape)."""
    low = image.min()
    return float(low), float((image == low).float().mean())


def padding_value(image: torch.Tensor, min_fraction: float = MIN_PADDING_FRACTION) -> float | None:
    """The value ``image`` holds outside its field of view: its lowest value where at least ``min_fraction`` of the
    voxels hold exactly that value; ``None`` where no such padding is found."""
    low, share = padding_fraction(image)
    return low if share >= min_fraction else None
