"""SegRegInferer: every region pair of a case through the backbone (cropped, batched), composed into one field."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.inferers import Inferer
from monai.networks.blocks import Warp

from custom.composer import FieldComposer
from custom.networks import VelocityToDisplacement
from custom.regions import bounding_box, labels_to_regions, present_labels


def plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata (``MetaTensor`` -> ``Tensor``) so arithmetic stays cheap."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def select_regions(fixed_label, moving_label, region_ids: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Regions to register (present in both label maps) and regions skipped (present in only one).

    ``region_ids=None`` considers every id found in either map. Skipped regions are reported with a warning.
    """
    in_fixed, in_moving = set(present_labels(fixed_label)), set(present_labels(moving_label))
    wanted = set(region_ids) if region_ids is not None else in_fixed | in_moving
    used = sorted(wanted & in_fixed & in_moving)
    skipped = sorted((wanted & (in_fixed | in_moving)) - set(used))
    if skipped:
        warnings.warn(
            f"regions {skipped} are present in only one of the fixed/moving label maps and are skipped; "
            "their voxels fall to the background region.",
            stacklevel=2,
        )
    if not used:
        raise ValueError("no region is present in both label maps; nothing to register.")
    return used, skipped


def composition_weights(fixed_label: torch.Tensor, regions: Sequence[int]) -> torch.Tensor:
    """Fixed-space one-hot weights ``(1, N, *S)``; voxels of unregistered labels join region 0 if it is registered."""
    w = labels_to_regions(fixed_label, regions)
    if 0 in regions:
        idx = list(regions).index(0)
        w[:, idx] = w[:, idx] + (1.0 - w.sum(1)).clamp_min(0)
    return w


def crop_boxes(fixed_masks: torch.Tensor, moving_masks: torch.Tensor, margin: int, crop: bool) -> list:
    """Per region, the box (slices) covering its fixed and moving masks plus ``margin``; whole grid if not ``crop``."""
    spatial = fixed_masks.shape[2:]
    boxes = []
    for i in range(fixed_masks.shape[1]):
        if not crop:
            boxes.append(tuple(slice(0, s) for s in spatial))
            continue
        union = torch.maximum(fixed_masks[0, i], moving_masks[0, i])
        boxes.append(bounding_box(union, margin))
    return boxes


def padded_shape(shapes: Sequence[Sequence[int]], divisor: int) -> tuple[int, ...]:
    """Smallest shape that holds every shape in ``shapes`` and is a multiple of ``divisor`` on each axis."""
    return tuple(int(math.ceil(max(s[d] for s in shapes) / divisor) * divisor) for d in range(len(shapes[0])))


class SegRegInferer(Inferer):
    """Register a pair region by region with one shared backbone and compose the sub-fields.

    For each region present in both label maps: crop the bounding box of its fixed and moving masks plus
    ``margin``, mask the images (I_m * S_m^i, I_f * S_f^i), run up to ``max_batch`` regions at once through the
    network (each batch zero-padded to a multiple of ``divisor``), integrate the velocity (``num_steps`` scaling and
    squaring steps, 0 = the network predicts displacements), paste the sub-field back and compose
    ``u = sum_i w_i u_i`` with the fixed masks (smoothed by ``sigma`` if given). Then warp the moving image
    (bilinear) and label map (nearest).

    ``__call__(inputs, network, fixed_label, moving_label)``: ``inputs`` ``(B, 2, *S)`` = ``cat([moving, fixed])``,
    label maps ``(B, 1, *S)``. Returns ``{"ddf": (B, D, *S) voxels, "warped_image": (B, 1, *S),
    "warped_label": (B, 1, *S)}``.

    Args:
        margin: voxels added around each region's box; keep it above the largest expected displacement (and
            ``3 * sigma``).
        max_batch: most regions per forward pass (bounds memory).
        divisor: crops are padded to multiples of this (the backbone's 2 ** number of poolings).
        num_steps: integration steps (``DVF2DDF``); 0 if the network outputs displacements.
        crop: set False to run every region on the whole grid.
        sigma: optional Gaussian smoothing (voxels) of the composition weights.
        region_ids: regions to register (``None`` = every id present in both images).
        amp: run the backbone (only) under autocast.
        global_region: register the whole pair as one region (the baseline: plain VoxelMorph on unmasked images).
    """

    def __init__(
        self,
        margin: int = 8,
        max_batch: int = 4,
        divisor: int = 16,
        num_steps: int = 7,
        crop: bool = True,
        sigma: float | None = None,
        region_ids: Sequence[int] | None = None,
        amp: bool = False,
        global_region: bool = False,
    ) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.margin, self.max_batch, self.divisor, self.crop = margin, max_batch, divisor, crop
        self.region_ids = None if region_ids is None else [int(r) for r in region_ids]
        self.amp, self.global_region = amp, global_region
        self.integrate = VelocityToDisplacement(num_steps)
        self.composer = FieldComposer(sigma=sigma)
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="border")

    def __call__(self, inputs, network, fixed_label=None, moving_label=None, *args, **kwargs) -> dict:
        if fixed_label is None or moving_label is None:
            raise ValueError("SegRegInferer needs fixed_label and moving_label (label maps, (B, 1, *S)).")
        inputs, fixed_label, moving_label = plain(inputs), plain(fixed_label), plain(moving_label)
        if inputs.shape[1] != 2:
            raise ValueError(f"inputs must be cat([moving, fixed], dim=1) with 2 channels, got {tuple(inputs.shape)}")
        if fixed_label.shape[2:] != inputs.shape[2:] or moving_label.shape[2:] != inputs.shape[2:]:
            raise ValueError(
                f"label maps {tuple(fixed_label.shape)}, {tuple(moving_label.shape)} do not match the images "
                f"{tuple(inputs.shape)}; resample them to the image grid first."
            )
        ddf = torch.cat(
            [
                self.register_one(inputs[b : b + 1], network, fixed_label[b : b + 1], moving_label[b : b + 1])
                for b in range(inputs.shape[0])
            ]
        )
        moving = inputs[:, :1].float()
        return {
            "ddf": ddf,
            "warped_image": self.warp_image(moving, ddf),
            "warped_label": self.warp_label(moving_label.float(), ddf),
        }

    def register_one(self, pair: torch.Tensor, network, fixed_label, moving_label) -> torch.Tensor:
        """Composed ddf ``(1, D, *S)`` for one case."""
        spatial = pair.shape[2:]
        if self.global_region:
            fixed_masks = moving_masks = weights = pair.new_ones((1, 1) + tuple(spatial), dtype=torch.float32)
            regions = [-1]
        else:
            regions, _ = select_regions(fixed_label, moving_label, self.region_ids)
            fixed_masks = labels_to_regions(fixed_label, regions)
            moving_masks = labels_to_regions(moving_label, regions)
            weights = self.composer.prepare_weights(composition_weights(fixed_label, regions))
        boxes = crop_boxes(fixed_masks, moving_masks, self.margin, self.crop and not self.global_region)
        order = sorted(range(len(regions)), key=lambda i: math.prod(s.stop - s.start for s in boxes[i]))
        ddf = pair.new_zeros((1, len(spatial)) + tuple(spatial), dtype=torch.float32)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            shapes = [[s.stop - s.start for s in boxes[i]] for i in chunk]
            target = padded_shape(shapes, self.divisor)
            batch = pair.new_zeros((len(chunk), 2) + target, dtype=torch.float32)
            for j, i in enumerate(chunk):
                box = (slice(None), slice(None)) + boxes[i]
                dst = (j, slice(None)) + tuple(slice(0, n) for n in shapes[j])
                masks = torch.cat([moving_masks[:, i : i + 1], fixed_masks[:, i : i + 1]], 1)
                batch[dst] = (pair[box] * masks[box])[0]
            with torch.autocast(device_type=pair.device.type, enabled=self.amp):
                velocity = network(batch)
            sub = self.integrate(velocity)
            for j, i in enumerate(chunk):
                box = (slice(None), slice(None)) + boxes[i]
                src = (slice(j, j + 1), slice(None)) + tuple(slice(0, n) for n in shapes[j])
                ddf[box] += weights[:, i : i + 1][box] * sub[src]
        return ddf
