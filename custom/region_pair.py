"""Random region-pair transform for SegReg training: one region present in both images per call."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from custom.regions import normalised_edt, present_labels, source_name


def check_pair(data: Mapping, keys: Sequence) -> None:
    """Raise ``ValueError`` for a NaN image or an image/label shape mismatch (``keys`` = fixed, moving, labels)."""
    kf, km, klf, klm = keys
    for k in (kf, km):
        if torch.isnan(torch.as_tensor(data[k])).any():
            raise ValueError(f"image {source_name(data[k], k)} contains NaN; clean or re-export it before training.")
    for side, kimg, klab in (("fixed", kf, klf), ("moving", km, klm)):
        a, b = torch.as_tensor(data[kimg]).shape, torch.as_tensor(data[klab]).shape
        if a[1:] != b[1:]:
            raise ValueError(f"{side} image and label shapes differ: {tuple(a)} vs {tuple(b)}")


class RandRegionPaird(Randomizable, MapTransform):
    """Pick one region present in both label maps and return the masked pair, the masks and their EDT maps.

    Input keys (channel-first, unbatched): ``keys = (fixed_image, moving_image, fixed_label, moving_label)``,
    images ``(1, *S)``, label maps ``(1, *S)`` with integer ids, region 0 = background.

    Output keys, all ``(1, *S)`` float: ``fixed_region_image`` = I_f * S_f, ``moving_region_image`` = I_m * S_m,
    ``fixed_region_mask``, ``moving_region_mask``, ``fixed_region_edt``, ``moving_region_edt`` (EDT inside the
    region normalised to 0..1), and ``region_id`` (int). ``prefix`` is prepended to every output key.

    Args:
        keys: the four input keys in the order above.
        region_ids: regions that may be drawn; ``None`` = every id found in both label maps.
        include_background: whether region 0 may be drawn.
        edt_spacing: spacing passed to the EDT (``None`` = voxel units).
        prefix: prefix of the output keys.
    """

    def __init__(
        self,
        keys: KeysCollection = ("fixed_image", "moving_image", "fixed_label", "moving_label"),
        region_ids: Sequence[int] | None = None,
        include_background: bool = True,
        edt_spacing=None,
        prefix: str = "",
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 4:
            raise ValueError("RandRegionPaird needs 4 keys (fixed_image, moving_image, fixed_label, moving_label).")
        self.region_ids = None if region_ids is None else [int(r) for r in region_ids]
        self.include_background = include_background
        self.edt_spacing = edt_spacing
        self.prefix = prefix
        self._region = 0

    def candidates(self, fixed_label, moving_label) -> list[int]:
        """Region ids present in both label maps (and allowed by ``region_ids``/``include_background``)."""
        for lab in (fixed_label, moving_label):
            if all(v == 0 for v in present_labels(lab)):
                raise ValueError(
                    f"label map {source_name(lab)} is empty (background only): SegReg needs at least one region. "
                    "Check the file, or use the global (baseline) variant for unlabelled images."
                )
        common = set(present_labels(fixed_label)) & set(present_labels(moving_label))
        if self.region_ids is not None:
            common &= set(self.region_ids)
        if not self.include_background:
            common.discard(0)
        if not common:
            raise ValueError(
                f"no region is present in both {source_name(fixed_label)} and {source_name(moving_label)} "
                f"(allowed ids {self.region_ids})."
            )
        return sorted(common)

    def randomize(self, data: Sequence[int]) -> None:
        self._region = int(data[self.R.randint(len(data))])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        kf, km, klf, klm = self.keys
        check_pair(d, self.keys)
        self.randomize(self.candidates(d[klf], d[klm]))
        p, r = self.prefix, self._region
        for side, kimg, klab in (("fixed", kf, klf), ("moving", km, klm)):
            mask = (torch.as_tensor(d[klab]) == r).float()
            img = torch.as_tensor(d[kimg]).float()
            d[f"{p}{side}_region_mask"] = mask
            d[f"{p}{side}_region_image"] = img * mask
            d[f"{p}{side}_region_edt"] = normalised_edt(mask, sampling=self.edt_spacing)
        d[f"{p}region_id"] = r
        return d


class GlobalRegiond(MapTransform):
    """The baseline's "region pair": the whole images, with every foreground label one-hot as the mask.

    Writes the same keys as :class:`RandRegionPaird` so the same loss and trainer serve both variants (plain
    weakly-supervised VoxelMorph): ``*_region_image`` = the image, ``*_region_mask`` ``(L, *S)`` one-hot of
    ``label_ids``, ``*_region_edt`` ``(L, *S)`` their normalised EDT maps, ``region_id`` = -1.

    Args:
        keys: ``(fixed_image, moving_image, fixed_label, moving_label)``.
        label_ids: the foreground ids that form the mask channels (the bundle's label list without 0).
        edt_spacing: spacing passed to the EDT (``None`` = voxel units).
        prefix: prefix of the output keys.
    """

    def __init__(
        self,
        keys: KeysCollection = ("fixed_image", "moving_image", "fixed_label", "moving_label"),
        label_ids: Sequence[int] = (1,),
        edt_spacing=None,
        prefix: str = "",
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 4:
            raise ValueError("GlobalRegiond needs 4 keys (fixed_image, moving_image, fixed_label, moving_label).")
        if not label_ids:
            raise ValueError("GlobalRegiond needs at least one foreground label id")
        self.label_ids = [int(i) for i in label_ids]
        self.edt_spacing, self.prefix = edt_spacing, prefix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        kf, km, klf, klm = self.keys
        p = self.prefix
        check_pair(d, self.keys)
        for side, kimg, klab in (("fixed", kf, klf), ("moving", km, klm)):
            img, lab = torch.as_tensor(d[kimg]).float(), torch.as_tensor(d[klab])
            mask = torch.cat([(lab == i).float() for i in self.label_ids])
            d[f"{p}{side}_region_mask"] = mask
            d[f"{p}{side}_region_image"] = img
            d[f"{p}{side}_region_edt"] = normalised_edt(mask, sampling=self.edt_spacing)
        d[f"{p}region_id"] = -1
        return d
