"""Per-pair registration metrics as ignite metrics, for evaluator configs (key metric and additional metrics).

They read the decollated evaluator output: ``ddf`` from the inferer (flattened out of ``pred``) and the references
that ``custom.training.PairBatch`` hands on as the ``label`` dict (``fixed_reference``, ``moving_reference``,
``fixed_keypoints``, ``moving_keypoints``), and use the same functions as the written table (``custom.evaluation``),
so the logged key metric and ``metrics.csv`` agree. Values are averaged over pairs (NaN ignored); sums are
all-reduced across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from custom.evaluation import keypoint_tre, nan_mean, references
from custom.metrics import dice_per_label, jacobian_stats, warp_labels
from custom.utils import plain


def _batched(x) -> torch.Tensor:
    """A decollated item ``(C, *S)`` -> ``(1, C, *S)`` float tensor."""
    return plain(x).detach().float()[None]


class PerPairMetric(Metric):
    """Base: one value per pair from an output item (``dict``), mean over pairs. Subclasses define ``pair_value``."""

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output) -> None:
        items = [output] if isinstance(output, Mapping) else list(output)
        for item in items:
            value = float(self.pair_value(item))
            if np.isfinite(value):
                self._sum += value
                self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if self._count > 0 else float("nan")

    def pair_value(self, item: Mapping) -> float:
        raise NotImplementedError


class RegistrationDice(PerPairMetric):
    """Mean Dice (%) over ``labels`` (ids, 0 excluded) of the warped moving reference against the fixed reference."""

    def __init__(self, labels: Mapping | Sequence, **kwargs) -> None:
        super().__init__(**kwargs)
        keys = labels.keys() if isinstance(labels, Mapping) else range(len(labels))
        self.label_ids = [int(k) for k in keys if int(k) != 0]

    def pair_value(self, item: Mapping) -> float:
        refs = references(item)
        ddf, fixed, moving = (
            _batched(item["ddf"]),
            _batched(refs["fixed_reference"]),
            _batched(refs["moving_reference"]),
        )
        return nan_mean(dice_per_label(warp_labels(moving, ddf), fixed, self.label_ids, moving))


class SDlogJ(PerPairMetric):
    """Standard deviation of log det J (see ``custom.metrics.jacobian_stats``; ``border`` voxels dropped per axis)."""

    stat = "sdlogj"

    def __init__(self, det_offset: float = 0.0, border: int | Sequence[int] = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.det_offset, self.border = det_offset, border

    def pair_value(self, item: Mapping) -> float:
        return jacobian_stats(_batched(item["ddf"]), self.det_offset, self.border)[self.stat]


class NegJacobianPercent(SDlogJ):
    """% of voxels with det J <= 0."""

    stat = "neg_jac_percent"


class TRE(PerPairMetric):
    """Mean target registration error (mm) at the pair's keypoints (``fixed_keypoints``/``moving_keypoints``), in
    world space (``custom.evaluation.keypoint_tre``); pairs without keypoints are not counted."""

    def pair_value(self, item: Mapping) -> float:
        return keypoint_tre(_batched(item["ddf"]), references(item))
