"""Small analytic phantoms shared by the tests."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)[None, None]


def sliding_slabs(shape=(32, 32, 16), shift=3, seed=0, sigma=2.5):
    """Two textured slabs (x < X/2 and x >= X/2) that slide along y in opposite directions, each with an "organ".

    Slab 1 moves by +shift along y, slab 2 by -shift (periodic in y, so no gap opens). Each slab holds a bright
    box organ touching the sliding interface, where a globally smooth field must fail.

    Returns a dict of ``(1, 1, *S)`` tensors ``fixed``, ``moving``, ``fixed_regions``, ``moving_regions`` (slab ids 1,
    2), ``fixed_organs``, ``moving_organs`` (organ ids 1, 2) and ``true_ddf`` ``(1, 3, *S)``: +shift e_y in slab 1,
    -shift e_y in slab 2, so that ``moving(x + true_ddf(x)) == fixed(x)`` away from the y border.
    """
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    half = X // 2
    regions = np.ones(shape, np.int64)
    regions[half:] = 2
    organs = np.zeros(shape, np.int64)
    organs[half - 6 : half, Y // 2 - 6 : Y // 2 + 6, Z // 4 : Z - Z // 4] = 1
    organs[half : half + 6, Y // 2 - 6 : Y // 2 + 6, Z // 4 : Z - Z // 4] = 2
    texture = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    fixed = 0.2 + 0.4 * texture + 0.4 * (organs > 0)
    moving = np.zeros(shape)
    moving_organs = np.zeros(shape, np.int64)
    ddf = np.zeros((3,) + shape)
    for lab, s in ((1, shift), (2, -shift)):
        m = regions == lab
        moving += np.roll(np.where(m, fixed, 0.0), s, axis=1)
        moving_organs += np.roll(np.where(m, organs, 0), s, axis=1)
        ddf[1][m] = s
    return {
        "fixed": _t(fixed),
        "moving": _t(moving),
        "fixed_regions": _t(regions),
        "moving_regions": _t(regions),
        "fixed_organs": _t(organs),
        "moving_organs": _t(moving_organs),
        "true_ddf": torch.as_tensor(ddf, dtype=torch.float32)[None],
    }
