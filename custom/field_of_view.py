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


def find_padding(image: torch.Tensor, min_fraction: float = MIN_PADDING_FRACTION) -> tuple[float, float] | None:
    """``(value, share of the voxels)`` of the padding of ``image`` (any shape): its lowest value where at least
    ``min_fraction`` of the voxels hold exactly that value; ``None`` where no such padding is found."""
    low = image.min()
    share = float((image == low).float().mean())
    return (float(low), share) if share >= min_fraction else None


def padding_value(image: torch.Tensor, min_fraction: float = MIN_PADDING_FRACTION) -> float | None:
    """The value ``image`` holds outside its field of view (:func:`find_padding`), or ``None``."""
    found = find_padding(image, min_fraction)
    return None if found is None else found[0]
