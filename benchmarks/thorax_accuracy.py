"""SegReg's region sets against ANTs SyN, ConvexAdam and elastix on the CBCT-like synthetic thorax (issue 25, item 4).

Usage: ``pip install -e ".[bench]" && python benchmarks/thorax_accuracy.py [--subjects 2] [--sets 4mm 3mm]
[--data /tmp/segreg_thorax_accuracy] [--md docs/benchmarks/thorax_accuracy.md]``.

The pairs: every subject's two CBCT -> FBCT pairs of ``make_thorax(realism="cbct")`` (the upper abdomen under the
diaphragm, lung density that follows inflation, cone-beam artefacts, a field of view narrower than the body), at 80 x 64
x 64 x 4 mm and at 96 x 80 x 96 x 3 mm. The methods, each on the same pairs and scored by one scorer: the training-free
SegReg with the ``segreg_thorax`` bundle's settings and the ground-truth TotalSegmentator-style labels merged by the
``seed13`` or the ``extended`` region set (and the ``extended`` set with the fixed labels cut at the CBCT field of
view, as a segmentation of the CBCT itself would be); the same solver with one global field (its mask loss on every
TotalSegmentator label, as in ``peer_accuracy.py``); ConvexAdam with and without the field-of-view mask, ANTs SyN and
elastix B-spline with their defaults (``benchmarks/peers.py``; masks as in ``peer_accuracy.py``), and ANTs SyN with
every level run (antspyx's default iterations (40, 20, 0) stop at half resolution). Columns (:func:`score`): TRE over
the lung keypoints; end-point errors (mm) against the exact motion over the lungs, liver + stomach + spleen, the kidneys
(inside the CBCT field of view), the pleural band (8 mm either side of the lung surface, where the lungs slide along the
wall), every labelled voxel inside and outside the field of view, and the chest wall's bones (ribs, sternum, scapulae,
clavicles, spine: outside the rib cage); SDlogJ; % det J <= 0; CPU seconds of the registration (all threads; torch and
ITK on 2 threads).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from peer_accuracy import displacement as peer_displacement
from region_sets import region_set_maps
from scipy import ndimage
from synthetic_sets import REPO, THORAX_SETTINGS, ground_truth_labels, register_with_labels

from custom.datasets.learn2reg import learn2reg_pairs, read_keypoints
from custom.io import save_text
from custom.metrics import jacobian_stats, tre_mm
from custom.synthetic.thorax import TOTALSEG_IDS, make_thorax

SETS = {"4mm": ((80, 64, 64), (4.0, 4.0, 4.0), 7), "3mm": ((96, 80, 96), (3.0, 3.0, 3.0), 11)}
METHODS = {
    "none": "no registration",
    "seed13": "SegReg, seed13 regions",
    "extended": "SegReg, extended regions",
    "extended_cut": "SegReg, extended regions, fixed labels end at the FOV",
    "global": "SegReg solver, one global region",
    "convexadam": "ConvexAdam + FOV mask",
    "convexadam_nomask": "ConvexAdam, no mask",
    "ants_syn": "ANTs SyN (antspyx defaults: last level at half resolution)",
    "ants_syn_full": "ANTs SyN, iterations (100, 70, 50): full resolution",
    "elastix_bspline": "elastix B-spline",
}
LUNGS = [TOTALSEG_IDS[n] for n in TOTALSEG_IDS if n.startswith("lung_")]
BONES = [TOTALSEG_IDS[n] for n in TOTALSEG_IDS if n.startswith(("rib_", "vertebrae_", "scapula", "clavicula", "stern"))]
COLUMNS = {
    "tre": "TRE mm",
    "lungs": "lungs",
    "abdomen": "liver, stomach, spleen",
    "kidneys": "kidneys",
    "pleura": "pleural band",
    "in_fov": "in FOV",
    "out_fov": "outside FOV",
    "wall": "chest wall bones",
    "sdlogj": "SDlogJ",
    "folds": "% det J <= 0",
    "cpu": "CPU s",
}


def column_masks(rec: dict, band_mm: float = 8.0) -> dict:
    """The fixed-grid voxels each EPE column of :data:`COLUMNS` averages over (boolean arrays ``(*S)``)."""
    fixed = nib.load(rec["fixed_image"])
    spacing = np.linalg.norm(fixed.affine[:3, :3], axis=0)
    fov = fixed.get_fdata() > -1000  # the CBCT pads outside its field of view (and the air) with -1000 HU
    label = np.rint(nib.load(rec["fixed_label"]).get_fdata())
    lungs = np.isin(label, LUNGS)
    pleura = (ndimage.distance_transform_edt(~lungs, sampling=spacing) <= band_mm) & (
        ndimage.distance_transform_edt(lungs, sampling=spacing) <= band_mm
    )
    return {
        "lungs": lungs & fov,
        "abdomen": np.isin(label, (5, 6, 1)) & fov,
        "kidneys": np.isin(label, (2, 3)) & fov,
        "pleura": pleura & fov & (label >= 0),
        "in_fov": (label > 0) & fov,
        "out_fov": (label > 0) & ~fov,
        "wall": np.isin(label, BONES) & fov,
    }


def score(disp: np.ndarray, rec: dict, band_mm: float = 8.0) -> dict:
    """The columns of :data:`COLUMNS` (without CPU s) for ``disp`` ``(3, *S)`` (fixed voxels, Learn2Reg sense)."""
    spacing = np.linalg.norm(nib.load(rec["fixed_image"]).affine[:3, :3], axis=0)
    truth = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata(), -1, 0)
    err = np.linalg.norm((disp - truth) * spacing[:, None, None, None], axis=0)
    row = {k: float(err[m].mean()) if m.any() else float("nan") for k, m in column_masks(rec, band_mm).items()}
    kps = [read_keypoints(rec[k]) for k in ("fixed_keypoints", "moving_keypoints")]
    ddf = torch.as_tensor(np.asarray(disp, np.float32))[None]
    row["tre"] = float(tre_mm(ddf, *kps, spacing).mean())
    j = jacobian_stats(ddf)
    row.update({"sdlogj": j["sdlogj"], "folds": j["neg_jac_percent"]})
    return row


def voxel_counts(recs: list) -> str:
    """One line: how many voxels each EPE column averages over, per pair (smallest to largest). A column of a few
    voxels (the kidneys' upper poles at the volume's lower edge) moves with every pair."""
    counts = [{k: int(m.sum()) for k, m in column_masks(rec).items()} for rec in recs]
    parts = []
    for k in counts[0]:
        low, high = min(c[k] for c in counts), max(c[k] for c in counts)
        parts.append(f"{COLUMNS[k]} {low}" + (f"-{high}" if high != low else ""))
    return "Voxels per pair behind each EPE column (a column is the mean over the pairs that have any): " + (
        ", ".join(parts) + "."
    )


def register(method: str, rec: dict, maps: dict, tmp: Path) -> np.ndarray:
    """Displacement ``(3, *S)`` of ``method`` on the pair ``rec``."""
    if method in ("seed13", "extended", "extended_cut"):
        labels = ground_truth_labels(rec, maps[method.replace("_cut", "")])
        if method == "extended_cut":  # a segmentation of the CBCT itself stops at its field of view
            labels["fixed_label"][nib.load(rec["fixed_image"]).get_fdata() <= -1000] = 0
        return register_with_labels(rec, labels, dict(THORAX_SETTINGS), tmp)[0].numpy()
    if method == "ants_syn_full":
        return peer_displacement("ants_syn", "thorax", rec, None, None, tmp, reg_iterations=(100, 70, 50))
    return peer_displacement(method, "thorax", rec, dict(THORAX_SETTINGS), None, tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--data", default="/tmp/segreg_thorax_accuracy")
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks" / "thorax_accuracy.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    maps = region_set_maps()
    lines = [
        "# Thorax: SegReg against ANTs SyN, ConvexAdam and elastix on the CBCT-like synthetic thorax\n",
        f'Regenerate: `pip install -e ".[bench]" && python benchmarks/thorax_accuracy.py --subjects {args.subjects}`. '
        "CBCT -> FBCT pairs of `make_thorax(realism='cbct')`, mean over the pairs; EPE (mm) against the exact motion, "
        "lungs / liver, stomach, spleen / kidneys / pleural band (8 mm either side of the lung surface) / chest wall "
        "bones inside the CBCT field of view, and every labelled voxel inside and outside it; TRE over the lung "
        "keypoints; SegReg with the `segreg_thorax` bundle's settings and ground-truth labels; peers with their "
        f"defaults (`benchmarks/peers.py`); torch {torch.__version__}, 2 threads, CPU.\n",
    ]
    for name in args.sets:
        shape, spacing, seed = SETS[name]
        root = Path(args.data) / name
        js = root / "ThoraxCBCT_dataset.json"
        if not js.exists():
            make_thorax(str(root), args.subjects, shape, spacing, seed=seed, n_val=args.subjects, realism="cbct")
        recs = learn2reg_pairs(js, "registration_val", "segmentationsTr")
        lines += [
            f"\n## {len(recs)} pairs, {' x '.join(map(str, shape))} at {spacing[0]:g} mm\n",
            voxel_counts(recs) + "\n",
            "| method | "
            + " | ".join(f"EPE {c} mm" if k not in ("tre", "sdlogj", "folds", "cpu") else c for k, c in COLUMNS.items())
            + " |",
            "|---|" + "---|" * len(COLUMNS),
        ]
        for method in args.methods:
            rows = []
            with tempfile.TemporaryDirectory() as tmp:
                for rec in recs:
                    c0 = time.process_time()
                    disp = register(method, rec, maps, Path(tmp))
                    cpu = time.process_time() - c0
                    rows.append({**score(np.asarray(disp, np.float32), rec), "cpu": cpu})
            means = " | ".join(f"{np.nanmean([r[k] for r in rows]):.2f}" for k in COLUMNS)
            lines.append(f"| {METHODS[method]} | {means} |")
            print(name, lines[-1], flush=True)
    save_text("\n".join(lines) + "\n", args.md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
