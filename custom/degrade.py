"""Degraded segmentations in physical units: how registration accuracy follows segmentation quality.

SegReg registers with segmentations that come from a model in practice (nnU-Net, Swin-UNETR, TotalSegmentator), not
from ground truth. :func:`degrade_labels` turns a ground-truth label map into a worse one in the ways automatic
segmentations go wrong, each set in millimetres so a setting means the same on 1.8 x 1.8 x 10 mm cine MR and 1 mm CT:

- ``"erode"``: every label loses the voxels within ``amount_mm`` of its border (under-segmentation);
- ``"dilate"``: every label grows into the background by ``amount_mm`` (over-segmentation; labels never overwrite
  each other, a background voxel goes to the nearest label);
- ``"noise"``: the borders move by a smooth random field of about ``amount_mm`` (ragged, locally wrong borders);
- ``"shift"``: the whole label map moves by ``amount_mm`` in a random direction (a misplaced segmentation).

Used by ``benchmarks/segmentation_quality.py``. Label maps are integer numpy arrays ``(X, Y, Z)``; ``spacing`` is the
voxel size in mm per axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates

KINDS = ("erode", "dilate", "noise", "shift")


def _nearest_sample(label: np.ndarray, displacement_vox: np.ndarray) -> np.ndarray:
    """``label(x + d(x))`` with nearest-neighbour sampling; ``displacement_vox`` ``(D, *S)`` in voxels, borders
    replicated."""
    grid = np.indices(label.shape, dtype=np.float64) + displacement_vox
    return map_coordinates(label, grid, order=0, mode="nearest").astype(label.dtype)


def erode(label: np.ndarray, amount_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Every label without the voxels within ``amount_mm`` (centre to centre) of a voxel outside it."""
    out = label.copy()
    for i in np.unique(label):
        if i == 0:
            continue
        inside = label == i
        depth = distance_transform_edt(inside, sampling=spacing)
        out[inside & (depth <= amount_mm)] = 0
    return out


def dilate(label: np.ndarray, amount_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Background voxels within ``amount_mm`` of a label take the nearest label's id; labels keep their voxels."""
    if not (label > 0).any():
        return label.copy()
    dist, nearest = distance_transform_edt(label == 0, sampling=spacing, return_indices=True)
    out = label.copy()
    grow = (label == 0) & (dist <= amount_mm)
    out[grow] = label[tuple(ix[grow] for ix in nearest)]
    return out


def boundary_noise(label: np.ndarray, amount_mm: float, spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """``label`` resampled through a smooth random displacement whose mean magnitude is about ``amount_mm``
    (Gaussian-smoothed white noise, correlation length 3 * ``amount_mm`` per axis, at least one voxel)."""
    if amount_mm <= 0:
        return label.copy()
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=np.float64)
    sigma_vox = np.maximum(3.0 * amount_mm / spacing, 1.0)
    field = np.stack([gaussian_filter(rng.standard_normal(label.shape), sigma_vox) for _ in spacing])
    field *= amount_mm / max(float(np.linalg.norm(field, axis=0).mean()), 1e-12)  # mean |u| = amount (mm)
    return _nearest_sample(label, field / spacing.reshape((-1,) + (1,) * label.ndim))


def shift(label: np.ndarray, amount_mm: float, spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """``label`` translated by ``amount_mm`` in a random direction (uniform on the sphere, seeded)."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(label.ndim)
    direction /= np.linalg.norm(direction)
    offset_vox = -amount_mm * direction / np.asarray(spacing, dtype=np.float64)  # sample at x - d: content moves by +d
    return _nearest_sample(
        label, np.broadcast_to(offset_vox.reshape((-1,) + (1,) * label.ndim), (label.ndim,) + label.shape)
    )


def degrade_labels(
    label: np.ndarray, kind: str, amount_mm: float, spacing: Sequence[float], seed: int = 0
) -> np.ndarray:
    """``label`` degraded by ``kind`` (one of :data:`KINDS`) of ``amount_mm``; ``amount_mm = 0`` returns a copy."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if amount_mm < 0:
        raise ValueError(f"amount_mm must be >= 0 (millimetres), got {amount_mm!r}")
    label = np.asarray(label)
    if len(spacing) != label.ndim:
        raise ValueError(f"spacing {tuple(spacing)} must give one voxel size per axis of the {label.ndim}-D label map")
    if amount_mm == 0:
        return label.copy()
    if kind == "erode":
        return erode(label, amount_mm, spacing)
    if kind == "dilate":
        return dilate(label, amount_mm, spacing)
    if kind == "noise":
        return boundary_noise(label, amount_mm, spacing, seed)
    return shift(label, amount_mm, spacing, seed)
