"""Training and evaluation glue for MONAI engines: batch preparation and the region-pair training loss.

``SupervisedTrainer`` calls ``loss_function(pred, targets)``; :class:`RegionPairBatch` hands the trainer the
backbone input and a ``targets`` dict, and :class:`RegionPairLoss` turns the predicted velocity into a warp and
evaluates :class:`~custom.losses.SegRegLoss`. :class:`PairBatch` feeds whole pairs plus label maps to the inferers
in a ``SupervisedEvaluator`` and hands the evaluation references (label maps to score, keypoints) on as targets.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines import PrepareBatch
from monai.networks.blocks import Warp

from custom.geometry import voxel_spacing
from custom.losses import SegRegLoss
from custom.networks import VelocityToDisplacement
from custom.regions import source_name
from custom.utils import plain
from custom.validation import InputError

TARGET_KEYS = ("fixed_image", "moving_image", "fixed_mask", "moving_mask", "fixed_edt", "moving_edt")


def _to(x, device, non_blocking):
    return plain(x).to(device=device, non_blocking=non_blocking)


class RegionPairBatch(PrepareBatch):
    """Trainer batch from :class:`~custom.region_pair.RandRegionPaird` (or ``GlobalRegiond``) outputs.

    Returns ``(cat([moving, fixed], 1), targets)`` with images ``(B, 1, *S)`` and ``targets`` a dict of
    ``TARGET_KEYS`` (masked images, masks ``(B, C, *S)`` and EDT maps) read from ``<prefix>{fixed,moving}_region_*``,
    plus ``spacing`` (mm per axis, from the fixed image's affine; ``None`` without one) for the regulariser.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        p = self.prefix
        targets = {}
        for side in ("fixed", "moving"):
            for kind in ("image", "mask", "edt"):
                key = f"{p}{side}_region_{kind}"
                if key not in batchdata:
                    raise KeyError(f"batch has no {key!r}; put RandRegionPaird or GlobalRegiond in the preprocessing")
                targets[f"{side}_{kind}"] = _to(batchdata[key], device, non_blocking)
        inputs = torch.cat([targets["moving_image"], targets["fixed_image"]], dim=1)
        affine = getattr(batchdata.get("fixed_image"), "affine", None)
        targets["spacing"] = None if affine is None else voxel_spacing(affine).tolist()
        return inputs, targets


class PairBatch(PrepareBatch):
    """Evaluator batch: ``(cat([moving, fixed], 1), references, (), {"fixed_label", "moving_label"})``.

    The label maps ``(B, 1, *S)`` that drive the registration and the fixed voxel ``spacing`` (mm per axis) reach
    the inferer as keyword arguments. The evaluator's
    ``label`` is a dict of references, the one thing every metric and the written table score against
    (``custom.evaluation.references`` reads it):

    - ``fixed_reference`` / ``moving_reference``: the ground truth (``fixed_gt``/``moving_gt``) where the batch has it
      (automatic segmentations drive the registration), else the registration's own label maps; they keep their
      MONAI metadata (affine, file name);
    - ``fixed_keypoints`` / ``moving_keypoints`` ``(B, K, 3)`` where the batch has them (``LoadKeypointsd``).
    """

    def __init__(
        self,
        fixed_image: str = "fixed_image",
        moving_image: str = "moving_image",
        fixed_label: str = "fixed_label",
        moving_label: str = "moving_label",
        fixed_gt: str = "fixed_gt",
        moving_gt: str = "moving_gt",
    ) -> None:
        self.keys = (fixed_image, moving_image, fixed_label, moving_label)
        self.gt_keys = (fixed_gt, moving_gt)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing}; the preprocessing must load {list(self.keys)}")
        fixed, moving, fl, ml = (_to(batchdata[k], device, non_blocking) for k in self.keys)
        if fixed.shape != moving.shape:
            names = [source_name(batchdata[k], k) for k in self.keys[:2]]
            raise InputError(
                f"fixed {names[0]} {tuple(fixed.shape[2:])} and moving {names[1]} {tuple(moving.shape[2:])} are not on "
                "one grid; put custom.transforms.AlignPaird (and one spatial size) in the preprocessing"
            )
        inputs = torch.cat([moving, fixed], dim=1)
        has_gt = all(k in batchdata for k in self.gt_keys)
        if has_gt and not all(isinstance(batchdata[k], torch.Tensor) for k in self.gt_keys):
            raise TypeError(f"{list(self.gt_keys)} are in the batch but not loaded; add them to the LoadImaged keys")
        ref_keys = self.gt_keys if has_gt else self.keys[2:]
        refs = {
            f"{side}_reference": batchdata[k].to(device=device, non_blocking=non_blocking)
            for side, k in zip(("fixed", "moving"), ref_keys)
        }
        for side in ("fixed", "moving"):
            key = f"{side}_keypoints"
            if key in batchdata:
                refs[key] = _to(batchdata[key], device, non_blocking)
        affine = getattr(batchdata[self.keys[0]], "affine", None)
        spacing = None if affine is None else voxel_spacing(affine).tolist()
        return inputs, refs, (), {"fixed_label": fl, "moving_label": ml, "spacing": spacing}


class RegionPairLoss(torch.nn.Module):
    """``loss_function(velocity, targets)`` for ``SupervisedTrainer``: integrate, warp, then ``SegRegLoss``.

    ``velocity`` ``(B, D, *S)`` (backbone output, voxels) is integrated by scaling and squaring (``num_steps``,
    float32, outside autocast); the moving masked image (bilinear), mask and EDT maps are warped with it and
    compared with the fixed ones by ``loss`` (:class:`~custom.losses.SegRegLoss`, built in the config with
    ``_target_``); ``targets["spacing"]`` reaches a spacing-aware regulariser, ``frozen_components`` are held at 0
    (in-plane field). The last components (``sim``, ``mask``, ``reg``) are kept in ``self.last`` for logging.
    """

    def __init__(self, loss: SegRegLoss, num_steps: int = 7, frozen_components=()) -> None:
        super().__init__()
        if not isinstance(loss, SegRegLoss):
            raise TypeError(f"RegionPairLoss needs a custom.losses.SegRegLoss, got {type(loss).__name__}")
        self.integrate = VelocityToDisplacement(num_steps, frozen_components)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.loss = loss
        self.last: dict = {}

    def forward(self, velocity: torch.Tensor, targets: Mapping) -> torch.Tensor:
        if not isinstance(targets, Mapping):
            raise TypeError("RegionPairLoss needs the targets dict of RegionPairBatch as its second argument")
        ddf = self.integrate(velocity)
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            warped = self.warp(targets["moving_image"].float(), ddf)
            warped_mask = self.warp(targets["moving_mask"].float(), ddf) if self.loss.needs_mask else None
            warped_edt = self.warp(targets["moving_edt"].float(), ddf) if self.loss.needs_edt else None
            out = self.loss(
                warped,
                targets["fixed_image"].float(),
                warped_mask,
                targets["fixed_mask"].float(),
                ddf,
                warped_edt,
                targets["fixed_edt"].float(),
                spacing=targets.get("spacing"),
            )
        self.last = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]


def loss_components(loss: RegionPairLoss):
    """``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler``: the last loss components."""

    def _transform(output):
        return dict(loss.last) if loss.last else None

    return _transform
