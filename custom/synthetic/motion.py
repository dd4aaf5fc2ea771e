"""Piecewise-smooth motion with sliding borders and an exact ground-truth displacement.

Recipe shared by the generators: start from a *moving* anatomy (label map + image) and one smooth field per region
(``u_i``, fixed grid, voxels). A fixed voxel x belongs to the first region i (in priority order) whose moving mask
contains ``x + u_i(x)``; otherwise to the background field. The fixed image and label are the moving ones sampled at
``x + u(x)``, so ``u`` is the exact fixed -> moving displacement in the MONAI ``Warp`` / Learn2Reg convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates


def identity_grid(shape: Sequence[int]) -> np.ndarray:
    """``(3, X, Y, Z)`` voxel coordinates."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))


def sample(volume: np.ndarray, ddf: np.ndarray, order: int) -> np.ndarray:
    """``volume`` sampled at ``x + ddf(x)`` (order 0 = nearest, 1 = linear, border = nearest value)."""
    coords = identity_grid(volume.shape) + ddf
    return map_coordinates(volume, coords, order=order, mode="nearest")


def compose_sliding(
    moving_label: np.ndarray,
    fields: Mapping[int, np.ndarray],
    background: np.ndarray,
    priority: Sequence[int],
    return_owner: bool = False,
):
    """Ground-truth ``(3, *S)`` field: region i's field where ``moving_label(x + u_i(x)) == i``, else background.

    ``fields`` maps a label id to its field; ids not in ``fields`` use ``background`` (so they move with it). With
    ``return_owner`` also returns the ``(*S)`` map of which field moved each voxel (its label id; 0 = background):
    where the background field reaches into a region that moved away, the voxel shows what fills the gap, not a
    second copy of the region (see ``custom.synthetic.abdomen``).
    """
    ddf = background.copy()
    owner = np.zeros(moving_label.shape, np.int16)
    for lab in priority:
        if lab not in fields:
            continue
        hit = (sample(moving_label, fields[lab], order=0) == lab) & (owner == 0)
        ddf[:, hit] = fields[lab][:, hit]
        owner[hit] = lab
    return (ddf, owner) if return_owner else ddf


def smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed noise scaled to 0..1 (organ texture)."""
    t = gaussian_filter(rng.standard_normal(shape), sigma)
    return (t - t.min()) / max(t.max() - t.min(), 1e-8)


def smooth_field(shape, amplitude: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Random smooth ``(3, *S)`` field with peak magnitude about ``amplitude`` voxels."""
    f = np.stack([gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
    return (amplitude * f / max(np.abs(f).max(), 1e-8)).astype(np.float32)


def ellipsoid(shape, centre, radii) -> np.ndarray:
    """Boolean ellipsoid (voxel units)."""
    g = identity_grid(shape)
    c = np.asarray(centre, np.float32).reshape(3, 1, 1, 1)
    r = np.asarray(radii, np.float32).reshape(3, 1, 1, 1)
    return (((g - c) / r) ** 2).sum(0) <= 1.0


def render(label: np.ndarray, intensities: Mapping[int, float], texture: np.ndarray, texture_amp: float) -> np.ndarray:
    """Piecewise-constant intensities per label plus a shared texture."""
    img = np.zeros(label.shape, np.float32)
    for lab, val in intensities.items():
        img[label == lab] = val
    return img + texture_amp * texture.astype(np.float32)
