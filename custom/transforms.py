"""Dictionary transforms: merge label classes into the bundle's regions, load keypoint files."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.datasets.learn2reg import read_keypoints
from custom.regions import load_merge_map, merge_labels, source_name


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
