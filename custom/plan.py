"""The region plan: SegReg's defining step in one place.

A :class:`RegionPlan` is built from the fixed and moving label maps of one pair. It decides which regions are
registered (ids present in both maps), where each one is cropped (the box of its fixed and moving masks plus a margin),
how each is masked (I_m * S_m^i, I_f * S_f^i) and how the sub-fields are composed (``u = sum_i w_i u_i`` with the
fixed masks, through :class:`~custom.composer.FieldComposer`). Its users are solvers of the same plan:

- training draws one region of the plan per sample (:class:`custom.region_pair.RandRegionPaird`);
- the trained inferer runs every region through the backbone (:class:`custom.inferer.SegRegInferer`);
- the iterative solver optimises one field per region (:class:`custom.iterative.IterativeSegReg`).

The one-region baseline is the same plan with a single *global* region: the whole grid, unmasked images, and the
one-hot foreground labels as its masks (for the mask loss).

Shapes: label maps ``(1, 1, *S)`` (one pair), masks ``(1, C, *s)``, boxes are tuples of slices of the grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from custom.composer import FieldComposer, whole_box
from custom.regions import bounding_box, compact_labels, labels_to_regions, present_labels, source_name
from custom.utils import plain
from custom.validation import check_integer_labels

GLOBAL = -1  # region id of the one-region baseline


def select_regions(
    fixed_label,
    moving_label,
    region_ids: Sequence[int] | None = None,
    include_background: bool = True,
    warn: bool = True,
) -> tuple[list[int], list[int]]:
    """Regions to register (present in both label maps) and regions skipped (present in only one).

    ``region_ids=None`` considers every id found in either map. Skipped regions are reported with a warning (their
    voxels fall to the background region). Raises ``ValueError`` when no region is left.
    """
    in_fixed, in_moving = set(present_labels(fixed_label)), set(present_labels(moving_label))
    wanted = set(region_ids) if region_ids is not None else in_fixed | in_moving
    if not include_background:
        wanted.discard(0)
    used = sorted(wanted & in_fixed & in_moving)
    skipped = sorted((wanted & (in_fixed | in_moving)) - set(used))
    if skipped and warn:
        warnings.warn(
            f"regions {skipped} are present in only one of the fixed/moving label maps "
            f"({source_name(fixed_label)}, {source_name(moving_label)}) and are skipped; "
            "their voxels fall to the background region.",
            stacklevel=2,
        )
    if not used:
        raise ValueError(
            f"no region is present in both {source_name(fixed_label)} and {source_name(moving_label)} "
            f"(allowed ids {region_ids}); nothing to register."
        )
    return used, skipped


def composition_weights(fixed_label: torch.Tensor, regions: Sequence[int]) -> torch.Tensor:
    """Fixed-space one-hot weights ``(1, N, *S)``; voxels of unregistered labels join region 0 if it is registered."""
    w = labels_to_regions(fixed_label, regions)
    if 0 in regions:
        idx = list(regions).index(0)
        w[:, idx] = w[:, idx] + (1.0 - w.sum(1)).clamp_min(0)
    return w


def padded_shape(shapes: Sequence[Sequence[int]], divisor: int) -> tuple[int, ...]:
    """Smallest shape that holds every shape in ``shapes`` and is a multiple of ``divisor`` on each axis."""
    return tuple(int(math.ceil(max(s[d] for s in shapes) / divisor) * divisor) for d in range(len(shapes[0])))


def box_shape(box: Sequence[slice]) -> list[int]:
    return [s.stop - s.start for s in box]


class RegionPlan:
    """Which regions of one pair are registered, their crop boxes, masks and composition weights.

    Build it with :meth:`build`. Region ``i`` of the plan has id ``regions[i]`` (:data:`GLOBAL` for the baseline)
    and box ``boxes[i]``. Masks are computed on demand from the label maps, so a plan costs two label maps plus the
    composition weights (with a composer ``sigma``, each region's smoothed mask on its box is kept for the plan's
    lifetime).

    Args:
        fixed_label, moving_label: label maps ``(1, 1, *S)`` on one grid (integer ids, 0 = background).
        regions: region ids in plan order.
        boxes: one tuple of slices per region.
        label_ids: the foreground ids that form the masks of the global region.
        composer: the :class:`FieldComposer` that composes the sub-fields (its ``sigma`` smooths the weights).
        skipped: ids present in only one map (reported, not registered).
    """

    def __init__(self, fixed_label, moving_label, regions, boxes, label_ids=(), composer=None, skipped=()) -> None:
        self.fixed_label, self.moving_label = plain(fixed_label), plain(moving_label)
        self.regions, self.boxes = [int(r) for r in regions], [tuple(b) for b in boxes]
        self.label_ids = [int(i) for i in label_ids]
        self.composer = composer or FieldComposer()
        self.skipped = list(skipped)
        self._weights = None
        self._normaliser = None
        self._smoothed: dict[int, torch.Tensor] = {}
        self._normalised: dict[int, torch.Tensor] = {}
        self._hard: dict[int, torch.Tensor] = {}
        self._thin: list[int] | None = None

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        fixed_label: torch.Tensor,
        moving_label: torch.Tensor,
        region_ids: Sequence[int] | None = None,
        margin: int | Sequence[int] = 8,
        crop: bool = True,
        include_background: bool = True,
        global_region: bool = False,
        label_ids: Sequence[int] | None = None,
        composer: FieldComposer | None = None,
        warn: bool = True,
    ) -> RegionPlan:
        """Plan the registration of one pair.

        Args:
            fixed_label, moving_label: ``(1, 1, *S)`` label maps on one grid.
            region_ids: regions that may be registered (``None`` = every id present in both maps).
            margin: voxels added around each region's box (keep it above the largest expected displacement).
            crop: ``False`` gives every region the whole grid.
            include_background: whether region 0 is registered.
            global_region: plan the one-region baseline: one region, the whole grid, unmasked images.
            label_ids: foreground ids forming the global region's masks (``None`` = every foreground id present).
            composer: composes the sub-fields (default: hard masks).
            warn: report skipped regions.
        """
        if fixed_label.ndim < 3 or fixed_label.shape[:2] != (1, 1) or fixed_label.shape != moving_label.shape:
            raise ValueError(
                "a region plan needs fixed and moving label maps of one shape (1, 1, *S); got "
                f"{tuple(fixed_label.shape)} ({source_name(fixed_label)}) and {tuple(moving_label.shape)} "
                f"({source_name(moving_label)}). Resample them onto one grid first."
            )
        for lab in (fixed_label, moving_label):
            check_integer_labels(plain(lab), source_name(lab))
        fixed_label, moving_label = compact_labels(fixed_label), compact_labels(moving_label)
        spatial = fixed_label.shape[2:]
        if global_region:
            if label_ids is None:
                found = set(present_labels(fixed_label)) | set(present_labels(moving_label))
                label_ids = sorted(v for v in found if v != 0)
            if not label_ids:
                raise ValueError(
                    f"the label maps {source_name(fixed_label)} and {source_name(moving_label)} have no foreground "
                    "label; the global region's mask loss needs at least one."
                )
            return cls(fixed_label, moving_label, [GLOBAL], [whole_box(spatial)], label_ids, composer)
        regions, skipped = select_regions(fixed_label, moving_label, region_ids, include_background, warn)
        fixed_label, moving_label = plain(fixed_label), plain(moving_label)
        boxes = []
        for r in regions:
            if not crop:
                boxes.append(whole_box(spatial))
                continue
            union = (fixed_label[0, 0] == r) | (moving_label[0, 0] == r)
            boxes.append(bounding_box(union, margin))
        return cls(fixed_label, moving_label, regions, boxes, (), composer, skipped)

    # ---------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.regions)

    @property
    def is_global(self) -> bool:
        return self.regions == [GLOBAL]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.fixed_label.shape[2:])

    def box_shape(self, i: int) -> list[int]:
        """Spatial shape of region ``i``'s crop."""
        return box_shape(self.boxes[i])

    def crop(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``x`` ``(B, C, *S)`` cropped to region ``i``'s box -> ``(B, C, *s)``."""
        return x[(slice(None), slice(None)) + self.boxes[i]]

    def mask(self, side: str, i: int, crop: bool = True) -> torch.Tensor:
        """Region ``i``'s mask on the ``side`` ("fixed"/"moving") label map, float ``(1, C, *s)``.

        One channel (``label == id``) for a region; for the global region one channel per ``label_ids`` entry.
        """
        label = self._label(side)
        label = self.crop(label, i) if crop else label
        if self.regions[i] == GLOBAL:
            return labels_to_regions(label, self.label_ids)
        return (label == self.regions[i]).float()

    def masked_image(self, side: str, image: torch.Tensor, i: int, crop: bool = True) -> torch.Tensor:
        """``image`` ``(1, 1, *S)`` times region ``i``'s mask on ``side`` (unmasked for the global region)."""
        img = (self.crop(image, i) if crop else image).float()
        if self.regions[i] == GLOBAL:
            return img
        return img * self.mask(side, i, crop)

    def weights(self) -> torch.Tensor:
        """Composition weights ``(1, N, *S)`` (fixed masks, background filling unregistered labels), prepared by the
        composer (smoothed and renormalised if it has a ``sigma``; see :meth:`region_weight` for thin regions)."""
        if self._weights is None:
            if self.is_global:
                w = torch.ones((1, 1) + self.spatial_shape, device=self.fixed_label.device)
                self._weights = self.composer.prepare_weights(w)
            else:
                w = self.fixed_label.new_zeros((1, len(self)) + self.spatial_shape, dtype=torch.float32)
                for i in range(len(self)):
                    w[(slice(None), slice(i, i + 1)) + self.boxes[i]] = self.region_weight(i)
                self._weights = w
        return self._weights

    def region_weight(self, i: int) -> torch.Tensor:
        """Region ``i``'s composition weight on its box ``(1, 1, *s)``, computed from the box alone (a whole-grid stack
        of N weights is never built, so large volumes fit).

        Hard fixed masks, or with a composer ``sigma`` the smoothed masks renormalised to sum to 1. A region too thin
        to own any voxel after smoothing (its smoothed weight below 1/2 everywhere in its mask, e.g. a scapula 2 voxels
        thick) keeps its hard mask: its voxels follow its own field, not its neighbours'.
        """
        if self.is_global:
            return torch.ones((1, 1, *self.box_shape(i)), device=self.fixed_label.device)
        if not self.composer.normalise:
            return self.composer.smooth(self._hard_weight(i))
        thin = self._thin_regions()
        if not thin:  # no voxel keeps a hard weight
            return self._smooth_weight(i)
        hard = self._hard_weight(i)
        label = self.crop(self.fixed_label, i)
        in_thin = torch.isin(label, torch.as_tensor(thin, device=label.device, dtype=label.dtype)).float()
        w = self._smooth_weight(i) * (1.0 - in_thin)
        return w + hard if self.regions[i] in thin else w

    def _smooth_weight(self, i: int) -> torch.Tensor:
        """Region ``i``'s smoothed mask divided by the sum of all smoothed masks, on its box; computed once (the
        thin-region test and the composition both read it), after which its smoothed mask is no longer kept."""
        if i not in self._normalised:
            if self._normaliser is None:
                total = self.fixed_label.new_zeros((1, 1) + self.spatial_shape, dtype=torch.float32)
                for k in range(len(self)):
                    total[(slice(None), slice(None)) + self.boxes[k]] += self._smoothed_mask(k)
                self._normaliser = total.clamp_min(self.composer.eps)
            self._normalised[i] = self._smoothed_mask(i) / self.crop(self._normaliser, i)
            self._smoothed.pop(i)
        return self._normalised[i]

    def _smoothed_mask(self, i: int) -> torch.Tensor:
        """Region ``i``'s hard weight smoothed by the composer, on its box; computed once per plan and kept until
        :meth:`_smooth_weight` has divided it by the normaliser (on a 390 x 280 x 300 pair, smoothing each box three
        times took two thirds of the registration's CPU time)."""
        if i not in self._smoothed:
            self._smoothed[i] = self.composer.smooth(self._hard_weight(i))
        return self._smoothed[i]

    def _thin_regions(self) -> list[int]:
        """Ids of the regions whose smoothed weight stays below 1/2 everywhere inside their own fixed mask."""
        if self._thin is None:
            self._thin = []
            for i, r in enumerate(self.regions):
                inside = self._hard_mask(i)
                # the weights are >= 0: their largest value inside the mask is that of the weights times the mask
                if inside.any() and float((self._smooth_weight(i) * inside).max()) < 0.5:
                    self._thin.append(r)
        return self._thin

    def _hard_weight(self, i: int) -> torch.Tensor:
        """Fixed mask of region ``i`` on its box as a float weight; region 0 also takes the voxels of unregistered
        labels."""
        return self._hard_mask(i).float()

    def _hard_mask(self, i: int) -> torch.Tensor:
        """:meth:`_hard_weight` as bool, computed once per plan."""
        if i not in self._hard:
            label = self.crop(self.fixed_label, i)
            w = label == self.regions[i]
            if self.regions[i] == 0:
                w = w | ~torch.isin(label, torch.as_tensor(self.regions, device=label.device, dtype=label.dtype))
            self._hard[i] = w
        return self._hard[i]

    def new_field(self, dtype=torch.float32) -> torch.Tensor:
        """A zero displacement ``(1, D, *S)`` to paste sub-fields into."""
        return self.fixed_label.new_zeros((1, len(self.spatial_shape)) + self.spatial_shape, dtype=dtype)

    def paste(self, out: torch.Tensor, i: int, field: torch.Tensor) -> torch.Tensor:
        """Add region ``i``'s weighted sub-field ``(1, D, *s)`` into ``out`` ``(1, D, *S)`` (in place)."""
        return self.composer.paste(out, field, self.region_weight(i), self.boxes[i])

    def compose(self, fields: Sequence[torch.Tensor]) -> torch.Tensor:
        """``u = sum_i w_i u_i`` from the cropped sub-fields of every region, in plan order -> ``(1, D, *S)``."""
        return self.composer(list(fields), self.weights(), self.boxes, prepared=True)

    def _label(self, side: str) -> torch.Tensor:
        if side not in ("fixed", "moving"):
            raise ValueError(f"side must be 'fixed' or 'moving', got {side!r}")
        return self.fixed_label if side == "fixed" else self.moving_label
