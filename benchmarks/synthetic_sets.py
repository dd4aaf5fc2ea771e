"""The synthetic sets as the benchmark commands read them (``segmentation_quality.py``, ``number_of_regions.py``,
``peer_accuracy.py``).

:func:`synthetic_set` generates a set with the ``make-data`` defaults when it is absent and returns its pairs that
store the exact motion, the label ids to score, the training-free settings of its bundle and, for the thorax, the
TotalSegmentator -> 13 regions merge map.
"""

from __future__ import annotations

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
    "reg_domain": "region",
    "sigma": 2.0,
}


def synthetic_set(name: str, data: Path, n_pairs: int | None = None):
    """``(records, label ids, registration settings, merge map or None)`` of the synthetic ``name`` under ``data``.

    ACDC: every patient's ES -> ED pair (the training-free mode learns from none), in-plane field. Thorax: the
    Learn2Reg validation pairs with the bundle's settings. Abdomen: the inter-subject test pairs with their exact
    pairwise truth, default settings. ``n_pairs`` keeps the first pairs only.
    """
    from custom.__main__ import make_data

    if not (data / name).exists():
        make_data(name, str(data))
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
        recs = learn2reg_split(js, "test", 4, 2)
        write_pair_truths(js, recs, overwrite=True)  # fixed -> moving truth per pair (cheap)
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
