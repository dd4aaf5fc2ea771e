"""Per-pair metric rows and per-run summaries (mean and std per column), written as CSV + JSON.

:func:`pair_metrics` is the one metric path: the evaluator's key metric (``custom.handlers``) and the written table
both warp the moving *reference* label map (the ground truth where it exists) with the displacement through
:func:`custom.metrics.warp_labels` and score it against the fixed reference with the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from custom.io import save_csv, save_json
from custom.metrics import dice_per_label, hd95_per_label, jacobian_stats, tre_mm, warp_labels

CONVENTIONS = {
    "dice_<label>": "Dice in % of the moving reference label warped with nearest neighbour (border clamp) against "
    "the fixed reference; NaN where the label is absent from either map. References are the ground truth where it "
    "exists, else the label maps that drove the registration.",
    "dice_mean": "mean over the labels of the pair (NaN ignored); the run summary averages it over pairs.",
    "hd95_<label>": "95th-percentile Hausdorff distance in mm (MONAI compute_hausdorff_distance, voxel spacing of the "
    "fixed image): the larger of the two directed 95th percentiles of the surface distances.",
    "sdlogj": "standard deviation of log(det J) of x + u(x), det J from central differences (one-sided at the grid "
    "faces), clipped to [1e-9, 1e9], over the grid less 'jacobian_border' voxels per axis.",
    "neg_jac_percent": "% of the same voxels with det J <= 0 (folding).",
    "tre_mm": "mean target registration error in mm: the displacement sampled linearly at the fixed keypoints "
    "(voxel coordinates), added to them and compared with the moving keypoints, scaled by the voxel spacing.",
}


def references(item: Mapping) -> Mapping:
    """The references of one decollated evaluator output item: ``item["label"]`` (the dict that
    ``custom.training.PairBatch`` hands on as the evaluator's label) or the item itself if they were flattened."""
    refs = item["label"] if isinstance(item.get("label"), Mapping) else item
    if "fixed_reference" not in refs or "moving_reference" not in refs:
        raise KeyError(
            "the evaluator output has no fixed_reference/moving_reference: use custom.training.PairBatch as the "
            "evaluator's prepare_batch"
        )
    return refs


def nan_mean(values: torch.Tensor) -> float:
    """Mean of per-label values (NaN ignored; NaN if all are NaN)."""
    return float(np.nanmean(values.cpu().numpy())) if not torch.isnan(values).all() else math.nan


def pair_metrics(
    ddf: torch.Tensor,
    fixed_reference=None,
    moving_reference=None,
    labels: Mapping[int, str] | None = None,
    spacing=None,
    keypoints=None,
    jacobian_border: int | Sequence[int] = 2,
) -> dict:
    """One row: ``dice_<name>`` (%), ``hd95_<name>`` (mm), ``dice_mean``, ``hd95_mean``, ``sdlogj``,
    ``neg_jac_percent`` and, with ``keypoints=(fixed, moving)`` ``(K, 3)`` voxel coordinates, ``tre_mm``.

    ``ddf`` ``(1, 3, *S)`` voxels; reference label maps ``(1, 1, *S)``; ``spacing`` the fixed voxel size (mm).
    """
    row: dict = {}
    if fixed_reference is not None and moving_reference is not None and labels:
        ids = [k for k in labels if k != 0]
        warped = warp_labels(moving_reference, ddf)
        dice = dice_per_label(warped, fixed_reference, ids, moving_reference)
        hd = hd95_per_label(warped, fixed_reference, ids, spacing, moving_reference)
        for k, d, h in zip(ids, dice.tolist(), hd.tolist()):
            row[f"dice_{labels[k]}"], row[f"hd95_{labels[k]}"] = d, h
        row["dice_mean"] = nan_mean(dice)
        row["hd95_mean"] = nan_mean(hd)
    row.update({k: v for k, v in jacobian_stats(ddf, border=jacobian_border).items() if k != "neg_jac_count"})
    if keypoints is not None:
        row["tre_mm"] = float(tre_mm(ddf, keypoints[0], keypoints[1], spacing or (1, 1, 1)).mean())
    return row


def summarise(rows: Sequence[dict]) -> dict:
    """``{column: {"mean", "std"}}`` over the numeric columns (NaN ignored)."""
    out = {}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        if not all(isinstance(v, (int, float)) for v in vals):
            continue
        arr = np.asarray(vals, dtype=np.float64)
        ok = ~np.isnan(arr)
        out[key] = {
            "mean": float(arr[ok].mean()) if ok.any() else math.nan,
            "std": float(arr[ok].std()) if ok.any() else math.nan,
        }
    return out


def write_table(
    rows: Sequence[dict], out_dir: str | Path, name: str = "metrics", settings: Mapping | None = None
) -> dict:
    """Write ``<name>.csv`` (one row per pair) and ``<name>.json`` (rows, mean/std, the metric conventions and the
    ``settings`` they were computed with, e.g. the Jacobian border); returns the summary."""
    out_dir = Path(out_dir)
    summary = summarise(rows)
    save_csv(list(rows), out_dir / f"{name}.csv")
    save_json(
        {"cases": list(rows), "summary": summary, "conventions": CONVENTIONS, "settings": dict(settings or {})},
        out_dir / f"{name}.json",
    )
    return summary
