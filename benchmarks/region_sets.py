"""Region sets of the thorax bundle on the CBCT-like synthetic thorax: ``seed13`` vs ``extended`` vs one global field.

Usage: ``python benchmarks/region_sets.py [--subjects 2] [--data /tmp/segreg_region_sets]
[--md docs/benchmarks/region_sets.md]``.

The set is ``make_thorax(realism="cbct")`` (80 x 64 x 64 at 4 mm; the upper abdomen under the diaphragm, lung density
that follows inflation, cone-beam artefacts, a field of view narrower than the body), every subject's two CBCT -> FBCT
pairs. Each method is the training-free solver with the ``segreg_thorax`` bundle's settings
(``synthetic_sets.THORAX_SETTINGS``), given the ground-truth TotalSegmentator-style labels merged by the region set's
map (global: one region). Scores against the exact motion, inside the CBCT field of view: end-point error (mm) over
the lungs, over liver + stomach + spleen, over the kidneys; TRE over the lung keypoints (mm); % det J <= 0; CPU
seconds of the registration. The same pairs against ANTs SyN, ConvexAdam and elastix: ``thorax_accuracy.py``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from synthetic_sets import REPO, THORAX_SETTINGS, register_with_labels

from custom.datasets.learn2reg import learn2reg_pairs, read_keypoints
from custom.io import save_text
from custom.metrics import jacobian_stats, tre_mm
from custom.regions import load_merge_map, merge_labels
from custom.synthetic.thorax import make_thorax

CONFIGS = REPO / "bundles" / "segreg_thorax" / "configs"
GROUPS = {"lungs": (10, 11, 12, 13, 14), "liver, stomach, spleen": (5, 6, 1), "kidneys": (2, 3)}


def region_set_maps() -> dict:
    """``{"seed13": map, "extended": map}``: the thorax bundle's TotalSegmentator -> region merge maps."""
    return {
        name: load_merge_map(CONFIGS / f"totalsegmentator_to_segreg{suffix}.json")["map"]
        for name, suffix in (("seed13", "13"), ("extended", "_extended"))
    }


def score(disp: np.ndarray, rec: dict) -> dict:
    """End-point errors per group (mm, inside the field of view), TRE (mm), % det J <= 0."""
    truth = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata(), -1, 0)
    spacing = np.linalg.norm(nib.load(rec["fixed_image"]).affine[:3, :3], axis=0)
    fov = nib.load(rec["fixed_image"]).get_fdata() > -1000
    label = np.rint(nib.load(rec["fixed_label"]).get_fdata())
    err = np.linalg.norm((disp - truth) * spacing[:, None, None, None], axis=0)
    row = {g: float(err[np.isin(label, ids) & fov].mean()) for g, ids in GROUPS.items()}
    kps = [read_keypoints(rec[k]) for k in ("fixed_keypoints", "moving_keypoints")]
    ddf = torch.as_tensor(disp, dtype=torch.float32)[None]
    row["TRE mm"] = float(tre_mm(ddf, *kps, spacing).mean())
    row["% det J <= 0"] = jacobian_stats(ddf)["neg_jac_percent"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--data", default="/tmp/segreg_region_sets")
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks" / "region_sets.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    js = Path(args.data) / "ThoraxCBCT_dataset.json"
    if not js.exists():
        make_thorax(args.data, n_subjects=args.subjects, n_val=args.subjects, seed=7, realism="cbct")
    recs = learn2reg_pairs(js, "registration_val", "segmentationsTr")
    maps = region_set_maps()
    rows = {"none": [], "SegReg, seed13": [], "SegReg, extended": [], "global": []}
    for rec in recs:
        raw = {k: np.rint(nib.load(rec[k]).get_fdata()).astype(np.int16) for k in ("fixed_label", "moving_label")}
        rows["none"].append({**score(np.zeros((3,) + raw["fixed_label"].shape), rec), "CPU s": 0.0})
        for method, merge in (
            ("SegReg, seed13", maps["seed13"]),
            ("SegReg, extended", maps["extended"]),
            ("global", None),
        ):
            if merge is None:
                labels = {k: np.ones_like(v) for k, v in raw.items()}
            else:
                labels = {k: merge_labels(v, merge, "ignore").astype(np.int16) for k, v in raw.items()}
            with tempfile.TemporaryDirectory() as tmp:
                disp, cpu = register_with_labels(rec, labels, dict(THORAX_SETTINGS), Path(tmp))
            rows[method].append({**score(disp.numpy(), rec), "CPU s": cpu})
            print(method, Path(rec["fixed_image"]).name, rows[method][-1], flush=True)
    cols = list(rows["none"][0])
    lines = [
        "# Region sets on the CBCT-like synthetic thorax\n",
        f"Regenerate: `python benchmarks/region_sets.py --subjects {args.subjects}`. {len(recs)} CBCT -> FBCT pairs of "
        "`make_thorax(realism='cbct')` (80 x 64 x 64 at 4 mm), the `segreg_thorax` bundle's solver settings, "
        "ground-truth labels; mean over the pairs; end-point errors (EPE, mm) against the exact motion inside the CBCT "
        f"field of view; torch {torch.__version__}, 2 threads, CPU.\n",
        "| method | " + " | ".join(f"EPE {c} mm" if c in GROUPS else c for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for method, rs in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{np.mean([r[c] for r in rs]):.2f}" for c in cols) + " |")
    save_text("\n".join(lines) + "\n", args.md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
