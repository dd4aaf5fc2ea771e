"""Per-pair metric rows and per-run summaries (mean and std per column), written as CSV + JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from custom.io import save_csv, save_json
from custom.metrics import dice_per_label, hd95_per_label, jacobian_stats, tre_mm


def pair_metrics(
    ddf: torch.Tensor,
    warped_label=None,
    fixed_label=None,
    moving_label=None,
    labels: Mapping[int, str] | None = None,
    spacing=None,
    keypoints=None,
) -> dict:
    """One row: ``dice_<name>`` (%), ``hd95_<name>`` (mm), ``dice_mean``, ``hd95_mean``, ``sdlogj``,
    ``neg_jac_percent`` and, with ``keypoints=(fixed, moving)``, ``tre_mm``. ``ddf`` ``(1, 3, *S)``."""
    row: dict = {}
    if warped_label is not None and labels:
        ids = [k for k in labels if k != 0]
        dice = dice_per_label(warped_label, fixed_label, ids, moving_label)
        hd = hd95_per_label(warped_label, fixed_label, ids, spacing, moving_label)
        for k, d, h in zip(ids, dice.tolist(), hd.tolist()):
            row[f"dice_{labels[k]}"], row[f"hd95_{labels[k]}"] = d, h
        row["dice_mean"] = float(np.nanmean(dice.numpy())) if not torch.isnan(dice).all() else math.nan
        row["hd95_mean"] = float(np.nanmean(hd.numpy())) if not torch.isnan(hd).all() else math.nan
    row.update({k: v for k, v in jacobian_stats(ddf).items() if k != "neg_jac_count"})
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


def write_table(rows: Sequence[dict], out_dir: str | Path, name: str = "metrics") -> dict:
    """Write ``<name>.csv`` (one row per pair) and ``<name>.json`` (rows + mean/std); returns the summary."""
    out_dir = Path(out_dir)
    summary = summarise(rows)
    save_csv(list(rows), out_dir / f"{name}.csv")
    save_json({"cases": list(rows), "summary": summary}, out_dir / f"{name}.json")
    return summary
