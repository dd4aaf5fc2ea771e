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
from pathlib import Path

import numpy as np
from synthetic_sets import REPO, ground_truth_labels, register_with_labels, score_displacement, synthetic_set

from custom.io import save_text

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


def score(rec, ids, settings, merge, grouping, global_region: bool, tmp: Path) -> dict:
    gt = ground_truth_labels(rec, merge)
    grouped = {}
    for key, arr in gt.items():
        grouped[key] = arr.copy()
        for src, dst in grouping.items():
            grouped[key][arr == src] = dst
    disp, cpu = register_with_labels(rec, grouped, {**settings, "global_region": global_region}, tmp)
    r = score_displacement(rec, disp, ids, merge)
    return {
        "Dice %": r["dice"],
        "EPE mm": r["epe_mm"],
        "EPE labelled mm": r["epe_labelled_mm"],
        "EPE border mm": r["epe_border_mm"],
        "SDlogJ": r["sdlogj"],
        "% det J <= 0": r["folds_percent"],
        "CPU s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_synthetic")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--sets", default="acdc,thorax", help="comma-separated: acdc, thorax")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    parts = [
        "# Registration accuracy against the number of regions\n\n"
        "Regenerate: `python benchmarks/number_of_regions.py`. Training-free per-region SegReg (the settings of "
        "`physical_accuracy.md`) with the ground-truth labels merged into fewer regions; every row is scored on the "
        "full ground truth (Dice of all its labels, end-point error against the exact motion, 'EPE border' in the "
        "2-voxel band around all label borders). Means over the pairs.\n"
    ]
    for name in args.sets.split(","):
        recs, ids, settings, merge = synthetic_set(name, data)
        rows = list(GROUPINGS[name].items()) + [("1 region (global field)", None)]
        lines = [f"### {name} ({len(recs)} pairs)\n", "| regions | " + " | ".join(COLS) + " |", "|---" * 8 + "|"]
        with tempfile.TemporaryDirectory() as tmp:
            for label, grouping in rows:
                res = [score(r, ids, settings, merge, grouping or {}, grouping is None, Path(tmp)) for r in recs]
                mean = {c: float(np.mean([x[c] for x in res])) for c in COLS}
                print(name, label, {c: round(v, 3) for c, v in mean.items()}, flush=True)
                lines.append(f"| {label} | " + " | ".join(f"{mean[c]:.2f}" for c in COLS) + " |")
        parts.append("\n".join(lines) + "\n")
    save_text("\n".join(parts), out / "number_of_regions.md")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
