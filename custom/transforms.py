"""Dictionary transforms: align a pair in physical space, merge label classes into regions, load keypoint files."""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Orientationd, ResampleToMatch
from monai.utils import ensure_tuple

from custom.datasets.learn2reg import read_keypoints
from custom.geometry import as_affine, overlap_fraction, same_grid, world_box
from custom.regions import load_merge_map, merge_labels, source_name
from custom.validation import InputError


class MergeLabelsd(MapTransform):
    """Map the label ids of ``keys`` through a merge-map JSON (e.g. TotalSegmentator classes -> 13 thorax regions).

    Ids that the map does not list become background and are reported with a warning naming the file
    (``unknown="error"`` raises instead). The map file format is documented in ``custom.regions.load_merge_map``.
    """

    def __init__(self, keys: KeysCollection, merge_map: str, unknown: str = "warn", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        if unknown not in ("warn", "error", "ignore"):
            raise ValueError(f"unknown must be 'warn', 'error' or 'ignore', got {unknown!r}")
        self.mapping = load_merge_map(merge_map)["map"]
        self.unknown = unknown

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = merge_labels(d[key], self.mapping, self.unknown, name=source_name(d[key], str(key)))
        return d


class LoadKeypointsd(MapTransform):
    """Read keypoint files (Learn2Reg CSV, one ``x,y,z`` voxel coordinate per row) into ``(K, 3)`` float tensors.

    The keypoints then travel with the batch to the metrics (``custom.training.PairBatch`` -> ``custom.handlers.TRE``
    and the writer's table). Keys missing from a record are skipped (``allow_missing_keys``, default True).
    """

    def __init__(self, keys: KeysCollection = ("fixed_keypoints", "moving_keypoints"), allow_missing_keys=True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                d[key] = torch.as_tensor(read_keypoints(d[key]))
        return d


class AlignPaird(MapTransform):
    """Bring a fixed/moving pair into one physical space before registration (after ``LoadImaged``).

    1. Every key is reoriented to ``axcodes`` (MONAI ``Orientationd``; default RAS), so a pair stored LPS and one stored
       RAS give the same arrays.
    2. Each label map must share its image's grid (shape and affine); otherwise an ``InputError`` names both files.
    3. If the moving image's grid differs from the fixed one (another origin, spacing, shape or direction), the moving
       image (bilinear) and its label maps (nearest) are resampled into the fixed image's grid through their affines
       (MONAI ``ResampleToMatch``), with a warning; grids whose world boxes overlap less than ``min_overlap`` (fraction
       of the fixed box) are refused with both files named.

    The original affines stay in each image's metadata (``original_affine``), so the writer can put the displacement
    back on the fixed image's original grid (``custom.geometry.displacement_to_grid``).
    """

    def __init__(
        self,
        fixed_keys: KeysCollection = ("fixed_image", "fixed_label", "fixed_gt"),
        moving_keys: KeysCollection = ("moving_image", "moving_label", "moving_gt"),
        axcodes: str | None = "RAS",
        min_overlap: float = 0.1,
    ) -> None:
        self.fixed_keys, self.moving_keys = list(ensure_tuple(fixed_keys)), list(ensure_tuple(moving_keys))
        super().__init__(self.fixed_keys + self.moving_keys, allow_missing_keys=True)
        self.orient = Orientationd(self.keys, axcodes=axcodes, allow_missing_keys=True) if axcodes else None
        self.min_overlap = float(min_overlap)

    @staticmethod
    def _grid(x):
        return x.affine, tuple(x.shape[1:])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.orient is not None:
            d = self.orient(d)
        for keys in (self.fixed_keys, self.moving_keys):
            image = keys[0]
            for k in keys[1:]:
                if k in d and not same_grid(*self._grid(d[image]), *self._grid(d[k])):
                    raise InputError(
                        f"label map {source_name(d[k], k)} is not on the grid of its image "
                        f"{source_name(d[image], image)} (shape {tuple(d[k].shape[1:])} vs "
                        f"{tuple(d[image].shape[1:])}, affines "
                        f"{np.round(as_affine(d[k].affine), 3).tolist()} vs "
                        f"{np.round(as_affine(d[image].affine), 3).tolist()}). Resample the label map onto its image."
                    )
        kf, km = self.fixed_keys[0], self.moving_keys[0]
        if same_grid(*self._grid(d[kf]), *self._grid(d[km])):
            return d
        frac = overlap_fraction(*self._grid(d[kf]), *self._grid(d[km]))
        names = f"fixed {source_name(d[kf], kf)} and moving {source_name(d[km], km)}"
        if frac < self.min_overlap:
            raise InputError(
                f"{names} do not share a physical space: their world boxes overlap {100 * frac:.1f} % of the fixed "
                f"one (fixed {world_box(*self._grid(d[kf]))}, moving {world_box(*self._grid(d[km]))} mm). Check the "
                "origins/directions in the headers, or pre-align the images (min_overlap sets the threshold)."
            )
        warnings.warn(
            f"{names} are on different grids; the moving image is resampled into the fixed grid.", stacklevel=2
        )
        moving = [k for k in self.moving_keys if k in d]
        modes = ["bilinear"] + ["nearest"] * (len(moving) - 1)
        for k, mode in zip(moving, modes):
            keep = {m: d[k].meta[m] for m in ("original_affine", "spatial_shape", "filename_or_obj") if m in d[k].meta}
            d[k] = ResampleToMatch(mode=mode, padding_mode="zeros")(d[k], d[kf])
            d[k].meta.update(keep)  # the moving file's own geometry and name, for the writer
        return d
