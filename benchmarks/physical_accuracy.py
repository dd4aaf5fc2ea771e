"""End-point error against the true motion on the synthetic sets: no registration, per-region SegReg, global.

Usage: ``python benchmarks/physical_accuracy.py [--data data/bench_synthetic] [--out docs/benchmarks]``.

Generates the synthetic ACDC, AbdomenCTCT and ThoraxCBCT sets (the ``make-data`` defaults) if absent, registers the
test pairs (ACDC: all 8 synthetic patients, none of which the training-free mode learns from) with the training-free
mode through ``custom.register.iterative_registration`` (physical space: affines,
spacing, displacement on the fixed image's original grid), and scores every displacement file the way a user's would
be: Dice of the ground-truth labels warped by it, end-point error (mm) against the stored exact motion overall, per
region and in the 2-voxel band around label borders, mean |through-plane displacement| where the truth has none,
SDlogJ, % det J <= 0 and CPU seconds per pair. ACDC runs with the in-plane field (the bundle default). The abdomen's
pairwise truth comes from the moving subject's regenerated organ fields (``custom.synthetic.abdomen.exact_pair_truth``);
the first row scores the truth itself (the ceiling of each column: Dice of labels it warps is below 100 % where
inter-subject organs differ in shape). Writes
``<out>/physical_accuracy.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from synthetic_sets import ground_truth_labels, register_with_labels, score_displacement

from custom.datasets.acdc import acdc_split
from custom.datasets.learn2reg import learn2reg_pairs, learn2reg_split
from custom.io import save_text
from custom.regions import load_merge_map
from custom.synthetic.abdomen import write_pair_truths

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "true motion (reference)": "truth",
    "no registration": None,
    "SegReg per region (box)": {"reg_domain": "box"},
    "SegReg per region (region)": {"reg_domain": "region"},
    "SegReg per region (region, sigma 2 mm)": {"reg_domain": "region", "sigma_mm": 2.0},
    "global (one region)": {"global_region": True},
}


def score(rec, labels, settings, merge=None) -> dict:
    """One pair registered with ``settings`` (``None``: no registration; ``"truth"``: the stored exact motion, the
    ceiling of every column) and scored by ``synthetic_sets.score_displacement``."""
    ids = [i for i in labels if i != 0]
    t0 = time.process_time()
    if settings is None:
        disp = np.zeros((3,) + nib.load(rec["fixed_label"]).shape, np.float32)
    elif settings == "truth":
        disp = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata().astype(np.float32), -1, 0)
    else:  # the registration sees the merged regions, as the bundle does
        with tempfile.TemporaryDirectory() as tmp:
            disp = register_with_labels(rec, ground_truth_labels(rec, merge), settings, Path(tmp))[0].numpy()
    cpu = time.process_time() - t0
    r = score_displacement(rec, disp, ids, merge)
    row = {"Dice %": r["dice"], "EPE mm": r["epe_mm"], "EPE labelled mm": r["epe_labelled_mm"]}
    row["EPE border mm"] = r["epe_border_mm"]
    if "through_plane_mm" in r:
        row["through-plane mm"] = r["through_plane_mm"]
    row.update({"SDlogJ": r["sdlogj"], "% det J <= 0": r["folds_percent"], "CPU s": cpu})
    return row


def table(name, records, labels, extra, merge=None) -> str:
    lines, cols = [], None
    for mode, settings in MODES.items():
        s = settings if settings in (None, "truth") else {**settings, **extra}
        rows = [score(r, labels, s, merge) for r in records]
        cols = cols or list(rows[0])
        mean = {c: np.mean([r[c] for r in rows]) for c in cols}
        lines.append(f"| {mode} | " + " | ".join(f"{mean[c]:.2f}" for c in cols) + " |")
        print(name, mode, {c: round(float(v), 3) for c, v in mean.items()}, flush=True)
    head = (
        f"### {name} ({len(records)} pairs)\n\n| method | "
        + " | ".join(cols)
        + " |\n"
        + "|---" * (len(cols) + 1)
        + "|\n"
    )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_synthetic")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--sets", default="acdc,thorax,abdomen", help="comma-separated subset to run")
    args = ap.parse_args()
    data = Path(args.data)
    from custom.__main__ import make_data

    abdomen_json = data / "abdomen" / "AbdomenCTCT_dataset.json"
    if abdomen_json.is_file() and "synthetic" not in json.loads(abdomen_json.read_text()):
        print(f"{abdomen_json.parent} predates the exact abdomen truth: regenerating it", flush=True)
        shutil.rmtree(abdomen_json.parent)
    for name in ("acdc", "abdomen", "thorax"):
        if not (data / name).exists():
            make_data(name, str(data))
    # every synthetic patient (the training-free mode trains on none of them): 8 pairs, not just the 2 test patients
    acdc = [
        r
        for part in ("train", "val", "test")
        for r in acdc_split(data / "acdc", part, directions=("ES_ED",))
        if "true_displacement" in r
    ]
    thorax = learn2reg_pairs(data / "thorax" / "ThoraxCBCT_dataset.json", "registration_val", "segmentationsTr")
    abdomen_json = data / "abdomen" / "AbdomenCTCT_dataset.json"
    # fixed -> moving truth per pair (rewritten: cheap, and sets made before the region-aware inversion are stale)
    write_pair_truths(abdomen_json, learn2reg_split(abdomen_json, "test", 4, 2), overwrite=True)
    abdomen = learn2reg_split(abdomen_json, "test", 4, 2)
    merge = load_merge_map(REPO / "bundles" / "segreg_thorax" / "configs" / "totalsegmentator_to_segreg13.json")["map"]
    # the segreg_thorax bundle's settings: HU window, CBCT field-of-view rule, schedule
    thorax_settings = {
        "level_spacing_mm": (16.0, 8.0, 4.0),
        "iterations": (50, 20, 10),
        "intensity_range": (-1000.0, 1000.0),
        "fov_value": 0.0,
    }
    sets = args.sets.split(",")
    parts = [
        "# Physical accuracy on the synthetic sets\n\nRegenerate: `python benchmarks/physical_accuracy.py`. "
        "Training-free mode, ground-truth labels, means over the test pairs (2 CPU cores; CPU s are indicative, the "
        "timed comparison with ConvexAdam is `iterative_speed.md`). 'box' and 'region' are "
        "the `reg_domain` settings: each region's field regularised over its whole crop or only inside its mask; "
        "'sigma 2 mm' smooths the composition weights (Gaussian of 2 mm: 2 / spacing voxels per axis) so the fields "
        "blend at region borders. "
        "'EPE labelled' averages over the labelled structures of the fixed image (the organs), 'EPE border' over the "
        "2-voxel band around label borders. The first row scores the stored true motion itself. The similarity is "
        "MIND-SSC with the noise gate (2: voxels where the fixed image is flat up to its noise do not count; "
        "`custom.mind.MINDSSCLoss`), the default of `python -m custom register` and of the thorax bundle.\n"
    ]
    if "acdc" in sets:
        parts.append(table("ACDC (ES -> ED, in-plane field)", acdc, range(4), {"frozen_components": (2,)}))
    if "thorax" in sets:
        parts.append(table("ThoraxCBCT (CBCT -> FBCT, 13 regions)", thorax, range(13), thorax_settings, merge))
    if "abdomen" in sets:
        parts.append(table("AbdomenCTCT (inter-subject, 13 organs)", abdomen, range(14), {}))
    out = Path(args.out)
    save_text("\n".join(parts), out / f"physical_accuracy{'' if len(sets) == 3 else '_' + '_'.join(sets)}.md")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
