"""The synthetic sets as the benchmark commands read them (``segmentation_quality.py``, ``number_of_regions.py``,
``peer_accuracy.py``).

:func:`synthetic_set` generates a set with the ``make-data`` defaults when it is absent and returns its pairs that
store the exact motion, the label ids to score, the training-free settings of its bundle and, for the thorax, the
TotalSegmentator -> 13 regions merge map.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from custom.datasets.acdc import acdc_split
from custom.datasets.learn2reg import learn2reg_pairs
from custom.regions import load_merge_map, merge_labels
from custom.register import iterative_registration

REPO = Path(__file__).resolve().parent.parent
# the segreg_thorax bundle's settings: levels in mm, schedule, HU window, CBCT field-of-view rule, composition
THORAX_SETTINGS = {
    "level_spacing_mm": (16.0, 8.0, 4.0),
    "iterations": (50, 20, 10),
    "intensity_range": (-1000.0, 1000.0),
    "fov_value": 0.0,
    "reg_domain": "auto",
    "sigma_mm": 2.0,
    "mask_only_levels": 2,
    "sample_stride": 2,
}


def in_child_process(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` in a fresh (spawned) process. Generating a set in the benchmark's own process would
    raise its peak resident memory, which Linux keeps across fork and exec: every worker started after it would report
    the generator's peak as its own."""
    job = multiprocessing.get_context("spawn").Process(target=fn, args=args, kwargs=kwargs)
    job.start()
    job.join()
    if job.exitcode != 0:
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)}{args} failed in its child process (exit code {job.exitcode})"
        )


def synthetic_set(name: str, data: Path, n_pairs: int | None = None):
    """``(records, label ids, registration settings, merge map or None)`` of the synthetic ``name`` under ``data``.

    ACDC: every patient's ES -> ED pair (the training-free mode learns from none), in-plane field. Thorax: the
    Learn2Reg validation pairs with the bundle's settings. Abdomen: the inter-subject test pairs with their exact
    pairwise truth, default settings. ``n_pairs`` keeps the first pairs only.
    """
    from custom.__main__ import make_data

    if not (data / name).exists():
        in_child_process(make_data, name, str(data))
    if name == "acdc":
        recs = [
            r
            for part in ("train", "val", "test")
            for r in acdc_split(data / "acdc", part, directions=("ES_ED",))
            if "true_displacement" in r
        ]
        return recs[:n_pairs], [1, 2, 3], {"frozen_components": (2,)}, None
    if name == "thorax":
        recs = learn2reg_pairs(data / "thorax" / "ThoraxCBCT_dataset.json", "registration_val", "segmentationsTr")
        merge = load_merge_map(REPO / "bundles" / "segreg_thorax" / "configs" / "totalsegmentator_to_segreg13.json")
        return recs[:n_pairs], list(range(1, 13)), dict(THORAX_SETTINGS), merge["map"]
    if name == "abdomen":
        from custom.datasets.learn2reg import learn2reg_split
        from custom.synthetic.abdomen import write_pair_truths

        js = data / "abdomen" / "AbdomenCTCT_dataset.json"
        write_pair_truths(js, learn2reg_split(js, "test", 4, 2), overwrite=True)  # fixed -> moving truth per pair
        recs = learn2reg_split(js, "test", 4, 2)  # read again: a record carries only the truths on disk when read
        return recs[:n_pairs], list(range(1, 14)), {}, None
    raise ValueError(f"unknown set {name!r}: acdc, thorax or abdomen")


def ground_truth_labels(rec: dict, merge=None) -> dict:
    """The pair's ground-truth label maps (``fixed_label``, ``moving_label``: int16 arrays), merged with ``merge``."""
    out = {}
    for key in ("fixed_label", "moving_label"):
        arr = np.rint(nib.load(rec[key]).get_fdata()).astype(np.int16)
        out[key] = merge_labels(arr, merge, "ignore").astype(np.int16) if merge else arr
    return out


def register_with_labels(rec: dict, labels: dict, settings: dict, tmp: Path) -> tuple[torch.Tensor, float]:
    """Training-free registration of the pair ``rec`` with the label maps ``labels`` (arrays on the pair's grids,
    written under ``tmp`` with the original affines): the displacement ``(3, *S)`` and the CPU seconds it took."""
    paths = {}
    for k, key in enumerate(("fixed_label", "moving_label")):
        paths[key] = Path(tmp) / f"{k}_{Path(rec[key]).name}"
        nib.save(nib.Nifti1Image(labels[key].astype(np.int16), nib.load(rec[key]).affine), paths[key])
    t0 = time.process_time()
    disp = iterative_registration(
        rec["fixed_image"],
        rec["moving_image"],
        str(paths["fixed_label"]),
        str(paths["moving_label"]),
        progress=False,
        **settings,
    )["disp"]
    return disp, time.process_time() - t0


def score_displacement(rec: dict, disp, ids, merge=None) -> dict:
    """The one scorer of the benchmark commands: ``disp`` ``(3, *S)`` (voxels of the fixed grid, Learn2Reg sense) on
    the pair ``rec`` against its ground truth.

    End-point error (mm) against the stored exact motion over all voxels (``epe_mm``), the labelled voxels
    (``epe_labelled_mm``), per labelled region (``epe_regions``, and their mean ``epe_region_mm``: every region weighs
    the same) and in the 2-voxel band around label borders (``epe_border_mm``), plus ``through_plane_mm`` on
    thick-slice data; TRE over the pair's keypoints where it has them (``tre_mm``); Dice and HD95 of the ground-truth
    labels warped by ``disp`` (``dice``, ``hd95_mm``; ids present in both maps); ``sdlogj`` and ``folds_percent``.
    """
    from custom.datasets.learn2reg import read_keypoints
    from custom.evaluation import epe_metrics
    from custom.metrics import dice_per_label, hd95_per_label, jacobian_stats, tre_mm, warp_labels

    disp = np.asarray(disp, dtype=np.float32)
    labels = ground_truth_labels(rec, merge)
    fl, ml = (torch.as_tensor(labels[k].astype(np.float32))[None, None] for k in ("fixed_label", "moving_label"))
    affine = nib.load(rec["moving_image"]).affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ddf = torch.as_tensor(disp)[None]
    warped = warp_labels(ml, ddf)
    truth = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata().astype(np.float32), -1, 0)
    present = [i for i in ids if (labels["fixed_label"] == i).any()]
    e = epe_metrics(disp, truth, affine, labels["fixed_label"], {i: str(i) for i in present})
    regions = {i: e[f"epe_{i}_mm"] for i in present if f"epe_{i}_mm" in e}
    row = {
        "epe_mm": e["epe_mm"],
        "epe_labelled_mm": e["epe_labelled_mm"],
        "epe_region_mm": float(np.mean(list(regions.values()))),
        "epe_border_mm": e["epe_border_mm"],
        "epe_regions": regions,
        "dice": float(np.nanmean(dice_per_label(warped, fl, ids, ml).numpy())),
        "hd95_mm": float(np.nanmean(hd95_per_label(warped, fl, ids, spacing, ml).numpy())),
    }
    if "through_plane_mm" in e:
        row["through_plane_mm"] = e["through_plane_mm"]
    if rec.get("fixed_keypoints"):
        kps = [read_keypoints(rec[k]) for k in ("fixed_keypoints", "moving_keypoints")]
        row["tre_mm"] = float(tre_mm(ddf, *kps, spacing).mean())
    j = jacobian_stats(ddf)
    row.update({"sdlogj": j["sdlogj"], "folds_percent": j["neg_jac_percent"]})
    return row
