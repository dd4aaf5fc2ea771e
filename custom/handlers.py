"""Registration metrics as MONAI cumulative metrics and ignite handlers, for evaluator configs.

Dice and HD95 use MONAI's own ``MeanDice`` / ``HausdorffDistance`` handlers on one-hot labels; this module adds
what MONAI lacks: SDlogJ, % of non-positive Jacobian determinants and TRE, all reading the composed ``ddf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from custom.metrics import jacobian_stats, tre_mm


class _PerCaseMetric(CumulativeIterationMetric):
    """A metric with one value per case; ``aggregate()`` returns the mean over cases (NaN ignored)."""

    def aggregate(self, reduction: str = "mean"):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("no data accumulated yet")
        value, _ = do_metric_reduction(data, reduction)
        return value


class JacobianMetric(_PerCaseMetric):
    """``y_pred`` = ddf ``(B, 3, X, Y, Z)``; ``stat`` = "sdlogj" or "neg_jac_percent" (see ``jacobian_stats``)."""

    def __init__(self, stat: str = "sdlogj", det_offset: float = 0.0) -> None:
        super().__init__()
        if stat not in ("sdlogj", "neg_jac_percent", "neg_jac_count"):
            raise ValueError(f"unknown Jacobian statistic {stat!r}")
        self.stat, self.det_offset = stat, det_offset

    def _compute_tensor(self, y_pred: torch.Tensor, y=None):
        vals = [jacobian_stats(y_pred[b : b + 1], self.det_offset)[self.stat] for b in range(y_pred.shape[0])]
        return torch.tensor(vals, dtype=torch.float32).view(-1, 1)


class TREMetric(_PerCaseMetric):
    """Mean TRE in mm per case. ``y_pred`` = ddf ``(B, 3, *S)``; ``y`` = keypoints ``(B, K, 6)`` (fixed xyz, moving
    xyz, voxel coordinates); ``spacing`` = moving voxel size in mm."""

    def __init__(self, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.spacing = spacing

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        if y is None:
            raise ValueError("TREMetric needs keypoints as y: (B, K, 6) = fixed xyz, moving xyz")
        vals = [tre_mm(y_pred[b : b + 1], y[b, :, :3], y[b, :, 3:], self.spacing).mean() for b in range(len(y))]
        return torch.stack(vals).view(-1, 1).cpu()


class SDlogJ(IgniteMetricHandler):
    """Ignite handler: mean SDlogJ over cases of ``engine.state.output[ddf_key]``."""

    def __init__(
        self,
        ddf_key: str = "ddf",
        det_offset: float = 0.0,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=JacobianMetric("sdlogj", det_offset),
            output_transform=output_transform or from_engine([ddf_key, ddf_key]),
            save_details=save_details,
        )


class NegJacobianPercent(IgniteMetricHandler):
    """Ignite handler: mean % of voxels with det J <= 0 over cases of ``engine.state.output[ddf_key]``."""

    def __init__(self, ddf_key: str = "ddf", output_transform: Callable | None = None, save_details: bool = True):
        super().__init__(
            metric_fn=JacobianMetric("neg_jac_percent"),
            output_transform=output_transform or from_engine([ddf_key, ddf_key]),
            save_details=save_details,
        )


class TRE(IgniteMetricHandler):
    """Ignite handler: mean TRE (mm) from ``engine.state.output[ddf_key]`` and ``[keypoints_key]`` (K, 6)."""

    def __init__(
        self,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        ddf_key: str = "ddf",
        keypoints_key: str = "keypoints",
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=TREMetric(spacing),
            output_transform=output_transform or from_engine([ddf_key, keypoints_key]),
            save_details=save_details,
        )
