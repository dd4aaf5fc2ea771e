"""Registration accuracy against segmentation quality (the paper's Figure 7 / Table A2), on the synthetic sets.

Usage: ``python benchmarks/segmentation_quality.py [--sets acdc,thorax] [--pairs 4] [--data data/bench_synthetic]
[--out docs/benchmarks]``.

The ground-truth label maps of each pair are degraded (``custom.degrade``: erosion, dilation, boundary noise, shift,
each in mm, the fixed and the moving map independently), the pair is registered with training-free per-region SegReg
on the degraded labels (``custom.register.iterative_registration``, the settings of ``physical_accuracy.py``), and the
displacement is scored against the ground truth: Dice of the ground-truth moving labels it warps against the
ground-truth fixed labels, and end-point error (mm) against the stored exact motion, overall and inside the labelled
structures. The segmentation quality of a setting is the mean Dice of the degraded maps against the ground truth.
Writes ``<out>/segmentation_quality.md`` (one row per setting, the fitted line and Pearson r of registration accuracy
against segmentation Dice over every pair and setting) and ``<out>/segmentation_quality_<set>.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from synthetic_sets import REPO, ground_truth_labels, register_with_labels, score_displacement, synthetic_set

from custom.degrade import degrade_labels
from custom.geometry import voxel_spacing
from custom.io import atomic_path, save_json, save_text
from custom.metrics import mean_dice

# (kind, mm): ground truth, then two levels of each way automatic segmentations fail
SETTINGS = [
    ("ground truth", 0.0),
    ("erode", 2.0),
    ("erode", 4.0),
    ("dilate", 2.0),
    ("dilate", 4.0),
    ("noise", 2.0),
    ("noise", 4.0),
    ("shift", 3.0),
    ("shift", 6.0),
]


def run_pair(rec, ids, settings, merge, kind, amount, seed, tmp: Path) -> dict:
    gt = ground_truth_labels(rec, merge)
    degraded, seg_dice = {}, []
    for k, key in enumerate(("fixed_label", "moving_label")):
        spacing = voxel_spacing(nib.load(rec[key]).affine).tolist()
        degraded[key] = (
            gt[key] if kind == "ground truth" else degrade_labels(gt[key], kind, amount, spacing, 2 * seed + k)
        )
        seg_dice.append(mean_dice(degraded[key], gt[key], ids))
    disp, cpu = register_with_labels(rec, degraded, settings, tmp)
    r = score_displacement(rec, disp, ids, merge)
    return {
        "segmentation Dice %": float(np.mean(seg_dice)),
        "registration Dice %": r["dice"],
        "EPE mm": r["epe_mm"],
        "EPE labelled mm": r["epe_labelled_mm"],
        "CPU s": cpu,
    }


def fit(x, y) -> tuple[float, float, float]:
    """Slope, intercept and Pearson r of the least-squares line y = a x + b."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b), float(np.corrcoef(x, y)[0, 1])


def figure(name: str, points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["segmentation Dice %"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    for ax, col in zip(axes, ("registration Dice %", "EPE labelled mm")):
        y = [p[col] for p in points]
        for kind in dict.fromkeys(p["kind"] for p in points):
            sel = [i for i, p in enumerate(points) if p["kind"] == kind]
            ax.scatter([x[i] for i in sel], [y[i] for i in sel], s=14, label=kind)
        a, b, r = fit(x, y)
        xs = np.linspace(min(x), max(x), 2)
        ax.plot(xs, a * xs + b, "k--", lw=1)
        ax.set_title(f"{col}: r = {r:.2f}", fontsize=9)
        ax.set_xlabel("segmentation Dice %", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{name}: registration accuracy vs segmentation quality", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_synthetic")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--sets", default="acdc,thorax", help="comma-separated: acdc, thorax")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per set (ACDC has 8, the thorax 2)")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Registration accuracy against segmentation quality\n\n"
        "Regenerate: `python benchmarks/segmentation_quality.py`. "
        "Training-free per-region SegReg (the settings of `physical_accuracy.md`) registers each pair with degraded "
        "label maps (`custom.degrade`: the fixed and moving maps degraded independently, amounts in mm) and is "
        "scored against the ground truth: Dice of the ground-truth labels it warps, end-point error against the exact "
        "motion. Means over the pairs; the fit (least squares, Pearson r) runs over every pair and setting.\n"
    ]
    for name in args.sets.split(","):
        recs, ids, settings, merge = synthetic_set(name, data, args.pairs)
        points = []
        with tempfile.TemporaryDirectory() as tmp:
            for kind, amount in SETTINGS:
                for p, rec in enumerate(recs):
                    row = run_pair(rec, ids, settings, merge, kind, amount, p, Path(tmp))
                    row.update(kind=kind, amount=amount)
                    points.append(row)
                mine = [q for q in points if q["kind"] == kind and q["amount"] == amount]
                print(name, kind, amount, {c: round(float(np.mean([q[c] for q in mine])), 2) for c in COLS}, flush=True)
        lines = [f"### {name} ({len(recs)} pairs)\n", "| segmentation | " + " | ".join(COLS) + " |", "|---" * 6 + "|"]
        for kind, amount in SETTINGS:
            mine = [q for q in points if q["kind"] == kind and q["amount"] == amount]
            label = kind if kind == "ground truth" else f"{kind} {amount:g} mm"
            lines.append(f"| {label} | " + " | ".join(f"{np.mean([q[c] for q in mine]):.2f}" for c in COLS) + " |")
        x = [q["segmentation Dice %"] for q in points]
        lines.append("")
        for col in ("registration Dice %", "EPE mm", "EPE labelled mm"):
            a, b, r = fit(x, [q[col] for q in points])
            lines.append(f"- {col} = {a:.3f} x segmentation Dice + {b:.2f} (r = {r:.2f}, {len(points)} points)")
        lines.append(
            "\nPer kind of error (its points and the ground-truth points), EPE labelled mm against segmentation Dice:\n"
        )
        for kind in dict.fromkeys(k for k, _ in SETTINGS[1:]):
            sel = [q for q in points if q["kind"] in (kind, "ground truth")]
            xs = [q["segmentation Dice %"] for q in sel]
            if np.ptp(xs) > 0:
                a, b, r = fit(xs, [q["EPE labelled mm"] for q in sel])
                lines.append(f"- {kind}: slope {a:.3f} mm per Dice point, r = {r:.2f} ({len(sel)} points)")
            else:
                lines.append(f"- {kind}: the amounts are below this set's voxel size; the labels did not change")
        save_json(points, out / f"segmentation_quality_{name}.json")
        png = out / f"segmentation_quality_{name}.png"
        figure(name, points, png)
        lines.append(f"\n![{name}]({png.name})\n")
        parts.append("\n".join(lines))
    save_text("\n".join(parts), out / "segmentation_quality.md")
    print("\n".join(parts))


COLS = ["segmentation Dice %", "registration Dice %", "EPE mm", "EPE labelled mm", "CPU s"]

if __name__ == "__main__":
    main()
