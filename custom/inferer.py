"""SegRegInferer: the trained solver of the region plan (every region through the backbone, cropped, batched)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer
from monai.networks.blocks import Warp

from custom.composer import FieldComposer
from custom.flags import as_bool
from custom.networks import VelocityToDisplacement
from custom.plan import RegionPlan, padded_shape
from custom.region_batch import group_by_shape
from custom.utils import plain
from custom.validation import InputError, check_finite


class SegRegInferer(Inferer):
    """Register a pair region by region with one shared backbone and compose the sub-fields.

    The pair's :class:`~custom.plan.RegionPlan` gives the regions present in both label maps, their boxes (fixed and
    moving masks plus ``margin``) and masks. Up to ``max_batch`` masked crops (I_m * S_m^i, I_f * S_f^i) go through
    the network at once, largest box first; each batch is zero-padded to its largest box, rounded up to a multiple of
    ``divisor``, and a region that would add more than ``max_padding`` (a fraction) padded voxels to its batch starts
    a new one (so small organs never run at the size of the background's box). The velocity is integrated
    (``num_steps`` scaling and squaring steps, 0 = the network predicts displacements) and the plan composes
    ``u = sum_i w_i u_i`` with the fixed masks (smoothed by ``sigma`` if given). Then the moving image (bilinear) and
    label map (nearest) are warped.

    ``__call__(inputs, network, fixed_label, moving_label)``: ``inputs`` ``(B, 2, *S)`` = ``cat([moving, fixed])``,
    label maps ``(B, 1, *S)`` (``spacing`` is accepted and unused: the network works in voxels of its training grid).
    Returns ``{"ddf": (B, D, *S) voxels, "warped_image": (B, 1, *S),
    "warped_label": (B, 1, *S)}``.

    Args:
        margin: voxels added around each region's box; keep it above the largest expected displacement (and
            ``3 * sigma``).
        max_batch: most regions per forward pass (bounds memory).
        max_padding: most padding a batch may carry, as a fraction of the voxels its crops need alone (each padded
            to ``divisor``); ``float("inf")`` pads every batch of ``max_batch`` to its largest box.
        divisor: crops are padded to multiples of this (the backbone's 2 ** number of poolings).
        num_steps: integration steps (``DVF2DDF``); 0 if the network outputs displacements.
        crop: set False to run every region on the whole grid.
        sigma: optional Gaussian smoothing (voxels) of the composition weights.
        region_ids: regions to register (``None`` = every id present in both images).
        amp: run the backbone (only) under autocast.
        global_region: register the whole pair as one region (the baseline: plain VoxelMorph on unmasked images).
        frozen_components: displacement components held at 0 (``(2,)``: in-plane field for thick-slice data).
        spatial_dims: spatial axes of the inputs (3; 2 for a 2-D backbone).
    """

    def __init__(
        self,
        margin: int = 8,
        max_batch: int = 4,
        max_padding: float = 0.5,
        divisor: int = 16,
        num_steps: int = 7,
        crop: bool = True,
        sigma: float | None = None,
        region_ids: Sequence[int] | None = None,
        amp: bool = False,
        global_region: bool = False,
        frozen_components: Sequence[int] = (),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0 (a fraction of the voxels the crops need), got {max_padding}")
        self.margin, self.max_batch, self.divisor, self.crop = margin, max_batch, divisor, crop
        self.max_padding = float(max_padding)
        self.region_ids = None if region_ids is None else [int(r) for r in region_ids]
        self.amp, self.global_region = as_bool(amp, "amp"), as_bool(global_region, "global_region")
        self.integrate = VelocityToDisplacement(num_steps, frozen_components)
        self.composer = FieldComposer(sigma=sigma)
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="border")

    def __call__(self, inputs, network, fixed_label=None, moving_label=None, *args, spacing=None, **kwargs) -> dict:
        if fixed_label is None or moving_label is None:
            raise ValueError("SegRegInferer needs fixed_label and moving_label (label maps, (B, 1, *S)).")
        inputs, fixed_label, moving_label = plain(inputs), plain(fixed_label), plain(moving_label)
        if inputs.ndim != self.spatial_dims + 2 or inputs.shape[1] != 2:
            axes = "X, Y, Z" if self.spatial_dims == 3 else "X, Y"
            raise InputError(
                f"SegRegInferer inputs must be cat([moving, fixed], dim=1): (B, 2, {axes}) for its "
                f"{self.spatial_dims}-D backbone (spatial_dims), got {tuple(inputs.shape)}; a 4-D series must be "
                "split into 3-D frames first."
            )
        if fixed_label.ndim != inputs.ndim or moving_label.ndim != inputs.ndim:
            raise InputError(
                f"label maps must be (B, 1, *S) like the images {tuple(inputs.shape)}, got {tuple(fixed_label.shape)} "
                f"and {tuple(moving_label.shape)}"
            )
        check_finite(inputs, "the input images (fixed/moving)")
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

    def plan(self, fixed_label, moving_label) -> RegionPlan:
        return RegionPlan.build(
            fixed_label,
            moving_label,
            region_ids=self.region_ids,
            margin=self.margin,
            crop=self.crop,
            global_region=self.global_region,
            composer=self.composer,
        )

    def batches(self, plan: RegionPlan) -> list[list[int]]:
        """Region indices of ``plan`` in forward passes (:func:`~custom.region_batch.group_by_shape` on the boxes padded
        to ``divisor``): at most ``max_batch`` per pass, none padded by more than ``max_padding``."""
        shapes = [padded_shape([plan.box_shape(i)], self.divisor) for i in range(len(plan))]
        return group_by_shape(shapes, self.max_padding, max_size=self.max_batch)

    def register_one(self, pair: torch.Tensor, network, fixed_label, moving_label) -> torch.Tensor:
        """Composed ddf ``(1, D, *S)`` for one case."""
        plan = self.plan(fixed_label, moving_label)
        moving, fixed = pair[:, :1], pair[:, 1:]
        ddf = plan.new_field()
        for chunk in self.batches(plan):
            shapes = [plan.box_shape(i) for i in chunk]
            target = padded_shape(shapes, self.divisor)
            batch = pair.new_zeros((len(chunk), 2) + target, dtype=torch.float32)
            for j, i in enumerate(chunk):
                dst = tuple(slice(0, n) for n in shapes[j])
                batch[(j, slice(0, 1)) + dst] = plan.masked_image("moving", moving, i)[0]
                batch[(j, slice(1, 2)) + dst] = plan.masked_image("fixed", fixed, i)[0]
            with torch.autocast(device_type=pair.device.type, enabled=self.amp):
                velocity = network(batch)
            sub = self.integrate(velocity)
            for j, i in enumerate(chunk):
                src = (slice(j, j + 1), slice(None)) + tuple(slice(0, n) for n in shapes[j])
                plan.paste(ddf, i, sub[src])
        return ddf
