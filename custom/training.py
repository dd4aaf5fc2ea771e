"""Training and evaluation glue for MONAI engines: batch preparation and the region-pair training loss.

``SupervisedTrainer`` calls ``loss_function(pred, targets)``; :class:`RegionPairBatch` hands the trainer the
backbone input and a ``targets`` dict, and :class:`RegionPairLoss` turns the predicted velocity into a warp and
evaluates :class:`~custom.losses.SegRegLoss`. :class:`PairBatch` feeds whole pairs plus label maps to
``SegRegInferer`` in a ``SupervisedEvaluator``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines import PrepareBatch
from monai.networks.blocks import Warp

from custom.inferer import plain
from custom.losses import SegRegLoss
from custom.networks import VelocityToDisplacement

TARGET_KEYS = ("fixed_image", "moving_image", "fixed_mask", "moving_mask", "fixed_edt", "moving_edt")


def _to(x, device, non_blocking):
    return plain(x).to(device=device, non_blocking=non_blocking)


class RegionPairBatch(PrepareBatch):
    """Trainer batch from :class:`~custom.region_pair.RandRegionPaird` (or ``GlobalRegiond``) outputs.

    Returns ``(cat([moving, fixed], 1), targets)`` with images ``(B, 1, *S)`` and ``targets`` a dict of
    ``TARGET_KEYS`` (masked images, masks ``(B, C, *S)`` and EDT maps) read from ``<prefix>{fixed,moving}_region_*``.
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
        return inputs, targets


class PairBatch(PrepareBatch):
    """Evaluator batch: ``(cat([moving, fixed], 1), fixed_label, (), {"fixed_label", "moving_label"})``.

    The label maps ``(B, 1, *S)`` reach :class:`~custom.inferer.SegRegInferer` as keyword arguments; the fixed
    label is also the evaluator's ``label`` (``CommonKeys.LABEL``) for MONAI's metric handlers.
    """

    def __init__(
        self,
        fixed_image: str = "fixed_image",
        moving_image: str = "moving_image",
        fixed_label: str = "fixed_label",
        moving_label: str = "moving_label",
    ) -> None:
        self.keys = (fixed_image, moving_image, fixed_label, moving_label)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing}; the preprocessing must load {list(self.keys)}")
        fixed, moving, fl, ml = (_to(batchdata[k], device, non_blocking) for k in self.keys)
        inputs = torch.cat([moving, fixed], dim=1)
        return inputs, fl, (), {"fixed_label": fl, "moving_label": ml}


class RegionPairLoss(torch.nn.Module):
    """``loss_function(velocity, targets)`` for ``SupervisedTrainer``: integrate, warp, then ``SegRegLoss``.

    ``velocity`` ``(B, D, *S)`` (backbone output, voxels) is integrated by scaling and squaring (``num_steps``,
    float32, outside autocast); the moving masked image (bilinear), mask and EDT maps are warped with it and
    compared with the fixed ones. The last components (``sim``, ``mask``, ``reg``) are kept in ``self.last`` for
    logging. Other keyword arguments go to :class:`~custom.losses.SegRegLoss`.
    """

    def __init__(self, num_steps: int = 7, **loss_kwargs) -> None:
        super().__init__()
        self.integrate = VelocityToDisplacement(num_steps)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.loss = SegRegLoss(**loss_kwargs)
        self.last: dict = {}

    def forward(self, velocity: torch.Tensor, targets: Mapping) -> torch.Tensor:
        if not isinstance(targets, Mapping):
            raise TypeError("RegionPairLoss needs the targets dict of RegionPairBatch as its second argument")
        ddf = self.integrate(velocity)
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            warped = self.warp(targets["moving_image"].float(), ddf)
            warped_mask = self.warp(targets["moving_mask"].float(), ddf)
            warped_edt = self.warp(targets["moving_edt"].float(), ddf)
            out = self.loss(
                warped,
                targets["fixed_image"].float(),
                warped_mask,
                targets["fixed_mask"].float(),
                ddf,
                warped_edt,
                targets["fixed_edt"].float(),
            )
        self.last = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]


def loss_components(loss: RegionPairLoss):
    """``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler``: the last loss components."""

    def _transform(output):
        return dict(loss.last) if loss.last else None

    return _transform


def pick_variant(variants: Mapping, name: str) -> Mapping:
    """The settings of variant ``name`` from a config's ``variants`` dict, with a clear error for unknown names."""
    if name not in variants:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(variants)} (config id 'variant')")
    return variants[name]
