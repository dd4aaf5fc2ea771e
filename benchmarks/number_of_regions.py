"""Registration accuracy against the number of regions (the paper's Table A3), on the synthetic sets.

Usage: ``python benchmarks/number_of_regions.py [--sets acdc,thorax] [--data data/bench_synthetic]
[--out docs/benchmarks]``.

Training-free per-region SegReg (the settings of ``physical_accuracy.py``) registers each pair with its ground-truth
labels merged into fewer regions, and every result is scored on the full ground truth (all labels), so the rows
compare like with like:

- ACDC (8 pairs): 4 regions (background, RV, myocardium, LV cavity), 3 (background, RV, LV = myocardium + cavity),
  2 (background, heart);
- ThoraxCBCT (2 pairs): the 13 merged TotalSegmentator classes, 4 (background, lungs, bones, mediastinum), 2
  (background, lungs: the sliding interface of breathing);
- and 1 region: the global field, the same optimiser.

Writes ``<out>/number_of_regions.md`` and prints it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from custom.datasets.acdc import acdc_split
from custom.datasets.learn2reg import learn2reg_pairs
from custom.degrade import mean_dice
from custom.evaluation import epe_metrics
from custom.geometry import warp_volume
from custom.metrics import jacobian_stats
from custom.regions import load_merge_map, merge_labels
from custom.register import iterative_registration

REPO = Path(__file__).resolve().parent.parent
THORAX_SETTINGS = {
    "level_spacing_mm": (16.0, 8.0, 4.0),
    "iterations": (50, 20, 10),
    "intensity_range": (-1000.0, 1000.0),
    "fov_value": 0.0,
    "reg_domain": "region",
    "sigma": 2.0,
}
# region groupings: {name: {label id: region id}} (ids not listed keep their own region)
GROUPINGS = {
    "acdc": {
        "4 regions (background, RV, myocardium, LV cavity)": {},
        "3 regions (background, RV, LV)": {3: 2},
        "2 regions (background, heart)": {2: 1, 3: 1},
    },
    "thorax": {
        "13 regions (the merged TotalSegmentator classes)": {},
        "4 regions (background, lungs, bones, mediastinum)": {
            **{i: 4 for i in (8, 9, 10, 11)},
            **{i: 12 for i in (1, 2, 5, 6, 7)},
        },
        "2 regions (background, lungs)": {i: 0 for i in (1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12)},
    },
}
COLS = ["Dice %", "EPE mm", "EPE labelled mm", "EPE border mm", "SDlogJ", "% det J <= 0", "CPU s"]


def records(name: str, data: Path):
    """(records, label ids, registration settings, TotalSegmentator merge map or None) of one synthetic set."""
    if name == "acdc":
        recs = [
            r
            for part in ("train", "val", "test")
            for r in acdc_split(data / "acdc", part, directions=("ES_ED",))
            if "true_displacement" in r
        ]
        return recs, [1, 2, 3], {"frozen_components": (2,)}, None
    if name == "thorax":
        recs = learn2reg_pairs(data / "thorax" / "ThoraxCBCT_dataset.json", "registration_val", "segmentationsTr")
        merge = load_merge_map(REPO / "bundles" / "segreg_thorax" / "configs" / "totalsegmentator_to_segreg13.json")
        return recs, list(range(1, 13)), THORAX_SETTINGS, merge["map"]
    raise ValueError(f"unknown set {name!r}: acdc or thorax")


def score(rec, ids, settings, merge, grouping, global_region: bool, tmp: Path) -> dict:
    gt, paths = {}, {}
    for k, key in enumerate(("fixed_label", "moving_label")):
        img = nib.load(rec[key])
        arr = np.rint(img.get_fdata()).astype(np.int16)
        gt[key] = merge_labels(arr, merge, "ignore").astype(np.int16) if merge else arr
        grouped = gt[key].copy()
        for src, dst in grouping.items():
            grouped[gt[key] == src] = dst
        paths[key] = tmp / f"{k}_{Path(rec[key]).name}"
        nib.save(nib.Nifti1Image(grouped, img.affine), paths[key])
    t0 = time.process_time()
    disp = iterative_registration(
        rec["fixed_image"],
        rec["moving_image"],
        str(paths["fixed_label"]),
        str(paths["moving_label"]),
        progress=False,
        global_region=global_region,
        **settings,
    )["disp"]
    cpu = time.process_time() - t0
    present = [i for i in ids if (gt["fixed_label"] == i).any() and (gt["moving_label"] == i).any()]
    warped = warp_volume(torch.as_tensor(gt["moving_label"], dtype=torch.float32), disp, "nearest").numpy()
    truth = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata().astype(np.float32), -1, 0)
    e = epe_metrics(disp.numpy(), truth, nib.load(rec["moving_image"]).affine, gt["fixed_label"])
    j = jacobian_stats(disp[None].float())
    return {
        "Dice %": mean_dice(warped, gt["fixed_label"], present),
        "EPE mm": e["epe_mm"],
        "EPE labelled mm": e["epe_labelled_mm"],
        "EPE border mm": e["epe_border_mm"],
        "SDlogJ": j["sdlogj"],
        "% det J <= 0": j["neg_jac_percent"],
        "CPU s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_synthetic")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--sets", default="acdc,thorax", help="comma-separated: acdc, thorax")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    from custom.__main__ import make_data

    parts = [
        "# Registration accuracy against the number of regions\n\n"
        "Regenerate: `python benchmarks/number_of_regions.py`. Training-free per-region SegReg (the settings of "
        "`physical_accuracy.md`) with the ground-truth labels merged into fewer regions; every row is scored on the "
        "full ground truth (Dice of all its labels, end-point error against the exact motion, 'EPE border' in the "
        "2-voxel band around all label borders). Means over the pairs.\n"
    ]
    for name in args.sets.split(","):
        if not (data / name).exists():
            make_data(name, str(data))
        recs, ids, settings, merge = records(name, data)
        rows = list(GROUPINGS[name].items()) + [("1 region (global field)", None)]
        lines = [f"### {name} ({len(recs)} pairs)\n", "| regions | " + " | ".join(COLS) + " |", "|---" * 8 + "|"]
        with tempfile.TemporaryDirectory() as tmp:
            for label, grouping in rows:
                res = [score(r, ids, settings, merge, grouping or {}, grouping is None, Path(tmp)) for r in recs]
                mean = {c: float(np.mean([x[c] for x in res])) for c in COLS}
                print(name, label, {c: round(v, 3) for c, v in mean.items()}, flush=True)
                lines.append(f"| {label} | " + " | ".join(f"{mean[c]:.2f}" for c in COLS) + " |")
        parts.append("\n".join(lines) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "number_of_regions.md").write_text("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
