"""Training samplers of the region plan: one random region pair per sample, or the baseline's global region."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from custom.plan import RegionPlan
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


class _PlanSampler(MapTransform):
    """Shared body: build the pair's plan, pick a region, write its masked images, masks and EDT maps."""

    def __init__(self, keys: KeysCollection, edt_spacing=None, prefix: str = "") -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 4:
            raise ValueError(
                f"{type(self).__name__} needs 4 keys (fixed_image, moving_image, fixed_label, moving_label)."
            )
        self.edt_spacing, self.prefix = edt_spacing, prefix

    def plan(self, fixed_label, moving_label) -> RegionPlan:
        raise NotImplementedError

    def pick(self, plan: RegionPlan) -> int:
        return 0

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        kf, km, klf, klm = self.keys
        check_pair(data, self.keys)
        return self.samples(data, self.plan(data[klf][None], data[klm][None]))

    def samples(self, data: Mapping, plan: RegionPlan):
        """What one pair yields: the picked region's sample (a list of samples for multi-sample samplers)."""
        return self.region_sample(data, plan, self.pick(plan))

    def region_sample(self, data: Mapping, plan: RegionPlan, i: int) -> dict:
        """``data`` plus region ``i``'s masked pair, masks and EDT maps."""
        d = dict(data)
        kf, km = self.keys[:2]
        p = self.prefix
        for side, kimg in (("fixed", kf), ("moving", km)):
            mask = plan.mask(side, i, crop=False)[0]
            d[f"{p}{side}_region_mask"] = mask
            d[f"{p}{side}_region_image"] = plan.masked_image(side, torch.as_tensor(d[kimg])[None], i, crop=False)[0]
            d[f"{p}{side}_region_edt"] = normalised_edt(mask, sampling=self.edt_spacing)
        d[f"{p}region_id"] = plan.regions[i]
        return d


class RandRegionPaird(Randomizable, _PlanSampler):
    """Pick one region of the pair's :class:`~custom.plan.RegionPlan` and return the masked pair, masks and EDT maps.

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
        num_samples: regions drawn per pair, without replacement (all of them when the pair has fewer). 1 (the
            paper's) returns one dict; more return a list, which MONAI's ``DataLoader`` collates into one batch. With
            one region per pair, each region of a pair with N regions is trained N times less often than the one
            global field of the baseline over the same epochs; drawing every region keeps the schedules comparable.
    """

    def __init__(
        self,
        keys: KeysCollection = ("fixed_image", "moving_image", "fixed_label", "moving_label"),
        region_ids: Sequence[int] | None = None,
        include_background: bool = True,
        edt_spacing=None,
        prefix: str = "",
        num_samples: int = 1,
    ) -> None:
        _PlanSampler.__init__(self, keys, edt_spacing, prefix)
        self.region_ids = None if region_ids is None else [int(r) for r in region_ids]
        self.include_background = include_background
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive number of regions per pair, got {num_samples!r}")
        self.num_samples = int(num_samples)

    def samples(self, data: Mapping, plan: RegionPlan):
        if self.num_samples == 1:
            return self.region_sample(data, plan, self.pick(plan))
        picks = self.R.permutation(len(plan))[: self.num_samples]
        return [self.region_sample(data, plan, int(i)) for i in sorted(picks)]

    def plan(self, fixed_label, moving_label) -> RegionPlan:
        for lab in (fixed_label, moving_label):
            if all(v == 0 for v in present_labels(lab)):
                raise ValueError(
                    f"label map {source_name(lab)} is empty (background only): SegReg needs at least one region. "
                    "Check the file, or use the global (baseline) variant for unlabelled images."
                )
        return RegionPlan.build(
            fixed_label,
            moving_label,
            region_ids=self.region_ids,
            crop=False,
            include_background=self.include_background,
            warn=False,
        )

    def randomize(self, data: int) -> None:
        self._index = int(self.R.randint(data))

    def pick(self, plan: RegionPlan) -> int:
        self.randomize(len(plan))
        return self._index


class GlobalRegiond(_PlanSampler):
    """The baseline's "region pair": the plan's global region (whole images, foreground labels one-hot as masks).

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
        _PlanSampler.__init__(self, keys, edt_spacing, prefix)
        if not label_ids:
            raise ValueError("GlobalRegiond needs at least one foreground label id")
        self.label_ids = [int(i) for i in label_ids]

    def plan(self, fixed_label, moving_label) -> RegionPlan:
        return RegionPlan.build(fixed_label, moving_label, global_region=True, label_ids=self.label_ids)
