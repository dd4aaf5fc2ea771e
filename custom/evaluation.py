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

from custom.geometry import original_geometry, through_plane_axis, tre_world
from custom.io import save_csv, save_json
from custom.metrics import dice_per_label, hd95_per_label, jacobian_stats, warp_labels
from custom.utils import plain

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
    "tre_mm": "mean target registration error in mm: the fixed keypoints (voxel coordinates of the fixed file) moved "
    "by the displacement (sampled linearly) and compared with the moving keypoints, in world coordinates (Learn2Reg's "
    "definition when both files share one grid).",
    "epe_mm": "end-point error against the true displacement, mm: |A (u - u_true)| with A the moving image's voxel "
    "axes, averaged over the fixed image's original grid (where the data set stores the exact motion).",
    "epe_<label>_mm": "the same, averaged inside the fixed ground-truth label.",
    "epe_labelled_mm": "the same, averaged over every labelled (non-background) voxel of the fixed ground truth.",
    "epe_border_mm": "the same, in the band of 'border_band' voxels around every border between labels (where "
    "organs slide).",
    "epe_in_fov_mm": "the same, over the labelled voxels inside the fixed image's field of view (its intensity above "
    "the writer's 'fov_threshold', e.g. -1000 HU for a cone-beam CT).",
    "epe_outside_fov_mm": "the same, over the labelled voxels outside it (where the image shows nothing to register).",
    "through_plane_mm": "mean |through-plane displacement| in mm over the foreground where the truth has none "
    "(thick-slice data: the axis whose spacing is over twice the others').",
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


def keypoint_tre(ddf: torch.Tensor, refs: Mapping) -> float:
    """Mean TRE (mm) of ``ddf`` ``(1, 3, *S)`` (registration grid) at the references' keypoints, in world space.

    The keypoints are voxel coordinates of the original fixed and moving files; the references' metadata give the
    registration grid and the original affines (``custom.geometry.tre_world``), so reorientation and resampling
    before registration are accounted for. NaN without keypoints.
    """
    if "fixed_keypoints" not in refs or "moving_keypoints" not in refs:
        return math.nan
    reg, fixed_orig, _ = original_geometry(refs["fixed_reference"])
    _, moving_orig, _ = original_geometry(refs["moving_reference"])
    fk, mk = (plain(refs[k]).detach().cpu() for k in ("fixed_keypoints", "moving_keypoints"))
    return float(tre_world(plain(ddf)[0].detach().cpu(), reg, fk, fixed_orig, mk, moving_orig).mean())


def pair_metrics(
    ddf: torch.Tensor,
    fixed_reference=None,
    moving_reference=None,
    labels: Mapping[int, str] | None = None,
    spacing=None,
    tre: float | None = None,
    jacobian_border: int | Sequence[int] = 2,
) -> dict:
    """One row: ``dice_<name>`` (%), ``hd95_<name>`` (mm), ``dice_mean``, ``hd95_mean``, ``sdlogj``,
    ``neg_jac_percent`` and ``tre_mm`` when ``tre`` (from :func:`keypoint_tre`) is given.

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
    if tre is not None and not math.isnan(tre):
        row["tre_mm"] = float(tre)
    return row


def summarise(rows: Sequence[dict]) -> dict:
    """``{column: {"mean", "std"}}`` over the numeric columns (NaN and rows without the column ignored, e.g. EPE
    where only some pairs have a true displacement)."""
    out = {}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
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


def border_band(label: np.ndarray, width: int = 2) -> np.ndarray:
    """Voxels within ``width`` voxels (chessboard) of a border between two labels."""
    from scipy.ndimage import maximum_filter, minimum_filter

    size = 2 * int(width) + 1
    return maximum_filter(label, size=size) != minimum_filter(label, size=size)


def epe_metrics(
    disp: np.ndarray,
    truth: np.ndarray,
    moving_affine,
    fixed_label: np.ndarray | None = None,
    labels: Mapping[int, str] | None = None,
    band: int = 2,
    fov: np.ndarray | None = None,
) -> dict:
    """End-point error columns (see ``CONVENTIONS``) of ``disp`` against ``truth``, both ``(3, *S)`` in the Learn2Reg
    sense on the fixed image's original grid; ``moving_affine`` turns voxel differences into mm; ``fov`` (bool,
    ``S``): the fixed image's field of view, for ``epe_in_fov_mm`` / ``epe_outside_fov_mm``."""
    if disp.shape != truth.shape:
        raise ValueError(f"displacement {disp.shape} and true displacement {truth.shape} are on different grids")
    lin = np.asarray(moving_affine, dtype=np.float64)[:3, :3]
    err = np.linalg.norm(np.einsum("ij,j...->i...", lin, disp - truth), axis=0)
    row = {"epe_mm": float(err.mean())}
    if fixed_label is None:
        return row
    fixed_label = np.rint(fixed_label).astype(np.int64)
    if (fixed_label > 0).any():
        row["epe_labelled_mm"] = float(err[fixed_label > 0].mean())
    for k, name in (labels or {}).items():
        inside = fixed_label == int(k)
        if int(k) != 0 and inside.any():
            row[f"epe_{name}_mm"] = float(err[inside].mean())
    if fov is not None:
        if fov.shape != fixed_label.shape:
            raise ValueError(f"field-of-view mask {fov.shape} and label map {fixed_label.shape} are on different grids")
        for key, where in (("epe_in_fov_mm", fov), ("epe_outside_fov_mm", ~fov)):
            inside = where & (fixed_label > 0)
            row[key] = float(err[inside].mean()) if inside.any() else math.nan
    edge = border_band(fixed_label, band)
    row["epe_border_mm"] = float(err[edge].mean()) if edge.any() else math.nan
    axis = through_plane_axis(np.linalg.norm(lin, axis=0))
    if axis is not None:
        step = np.linalg.norm(lin[:, axis])
        fg = (fixed_label > 0) & (np.abs(truth[axis]) * step < 1e-3)
        if fg.any():
            row["through_plane_mm"] = float(np.abs(disp[axis][fg]).mean() * step)
    return row
