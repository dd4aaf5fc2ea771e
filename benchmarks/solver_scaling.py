"""Sweep of the training-free solver's control grid and levels on the CBCT-like synthetic thorax (issue 25, item 3).

Usage: ``python benchmarks/solver_scaling.py [--subjects 2] [--data /tmp/segreg_solver_scaling]
[--md docs/benchmarks/solver_scaling.md]``.

Two sets of ``make_thorax(realism="cbct")`` (every subject's two CBCT -> FBCT pairs): 80 x 64 x 64 at 4 mm and
96 x 80 x 96 at 3 mm. Each row is the ``segreg_thorax`` bundle's solver (``synthetic_sets.THORAX_SETTINGS``, the
``extended`` region set, ground-truth labels) with one setting changed: every voxel scored at every step
(``sample_stride 1``, the solver before bundle 0.3.11), the lattice field and its regulariser on every level voxel
and one-region batches on two threads (the solver of bundle 0.3.13: the same loss), a finer control grid
(``grid_spacing 1``), a finer last level, more iterations, and a last level at 8 mm (the coarse end: about the cost
of ANTs SyN's defaults on these volumes, whose pyramid also ends at half their resolution). The row "grid 1,
one-voxel basis" is the solver before ``custom.iterative.ControlGrid`` (Adam on one parameter per voxel), for the
before/after comparison. Scores against the exact motion inside the CBCT field of view (``region_sets.score``): EPE
over the lungs, liver + stomach + spleen and the kidneys, TRE over the lung keypoints, % det J <= 0, CPU seconds;
"d lungs" and "d TRE" are the mean paired differences to the set's first row with their standard error over the
pairs (the noise the rows are judged by).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from region_sets import region_set_maps, score
from synthetic_sets import REPO, THORAX_SETTINGS, ground_truth_labels, register_with_labels

import custom.iterative
from custom.datasets.learn2reg import learn2reg_pairs
from custom.io import save_text
from custom.synthetic.thorax import make_thorax

BEFORE_0314 = "lattice field and regulariser on every level voxel, one-region batches on 2 threads (0.3.13)"
SETS = {"4 mm": ((80, 64, 64), (4.0, 4.0, 4.0), 7), "3 mm": ((96, 80, 96), (3.0, 3.0, 3.0), 11)}
ROWS = {
    "4 mm": [
        ("bundle defaults (grid 2, levels 16/8/4 mm, lattice stride 2)", {}),
        ("every voxel at every step (sample_stride 1, before 0.3.11)", {"sample_stride": 1}),
        (BEFORE_0314, {"_before_0314": True}),
        ("grid 1", {"grid_spacing": 1}),
        ("grid 1, one-voxel basis (before)", {"grid_spacing": 1, "_one_voxel_basis": True}),
        ("more iterations (50/20/20)", {"iterations": (50, 20, 20)}),
        ("levels 16/8 mm (last level at 8 mm, 50/20)", {"level_spacing_mm": (16.0, 8.0), "iterations": (50, 20)}),
    ],
    "3 mm": [
        ("bundle defaults (grid 2, levels 16/8/4 mm, lattice stride 2)", {}),
        ("every voxel at every step (sample_stride 1, before 0.3.11)", {"sample_stride": 1}),
        (BEFORE_0314, {"_before_0314": True}),
        ("grid 1", {"grid_spacing": 1}),
        ("grid 1, one-voxel basis (before)", {"grid_spacing": 1, "_one_voxel_basis": True}),
        (
            "+ 3 mm level (16/8/4/3, 50/20/10/10)",
            {"level_spacing_mm": (16.0, 8.0, 4.0, 3.0), "iterations": (50, 20, 10, 10)},
        ),
        ("levels 12/6/3 mm", {"level_spacing_mm": (12.0, 6.0, 3.0)}),
        ("levels 16/8 mm (last level at 8 mm, 50/20)", {"level_spacing_mm": (16.0, 8.0), "iterations": (50, 20)}),
    ],
}


class Before0314:
    """Context: the solver of bundle 0.3.13: a lattice-scored displacement upsampled to every level voxel and
    regularised there (``IterativeSegReg.lattice_on_control``), batches of one region on every thread
    (``single_region_voxels``); the same loss to float rounding."""

    def __enter__(self):
        cls = custom.iterative.IterativeSegReg
        self.saved = cls.lattice_on_control, cls.single_region_voxels
        cls.lattice_on_control, cls.single_region_voxels = False, 0

    def __exit__(self, *exc):
        cls = custom.iterative.IterativeSegReg
        cls.lattice_on_control, cls.single_region_voxels = self.saved


class OneVoxelBasis:
    """Context: ``ControlGrid`` without its two-voxel basis (the solver as it was before issue 25)."""

    def __enter__(self):
        self.init = custom.iterative.ControlGrid.__init__

        def init(grid, *args):
            self.init(grid, *args)
            grid.fine_axes, grid.scale = [], torch.ones_like(grid.scale)

        custom.iterative.ControlGrid.__init__ = init

    def __exit__(self, *exc):
        custom.iterative.ControlGrid.__init__ = self.init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--data", default="/tmp/segreg_solver_scaling")
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks" / "solver_scaling.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    merge = region_set_maps()["extended"]
    lines = [
        "# Solver scaling: control grid and levels on the CBCT-like synthetic thorax\n",
        f"Regenerate: `python benchmarks/solver_scaling.py --subjects {args.subjects}`. The `segreg_thorax` solver "
        "(extended region set, ground-truth labels) with one setting changed per row; mean over the CBCT -> FBCT pairs "
        "of `make_thorax(realism='cbct')`; EPE (mm) against the exact motion inside the CBCT field of view; "
        "d = mean paired difference to the set's first row +- its standard error over the pairs; the rows run one "
        "after another on each pair; "
        f"torch {torch.__version__}, 2 threads, CPU.\n",
    ]
    cols = ["lungs", "liver, stomach, spleen", "kidneys", "TRE mm", "% det J <= 0", "CPU s"]
    for name, (shape, spacing, seed) in SETS.items():
        root = Path(args.data) / name.replace(" ", "")
        js = root / "ThoraxCBCT_dataset.json"
        if not js.exists():
            make_thorax(str(root), args.subjects, shape, spacing, seed=seed, n_val=args.subjects, realism="cbct")
        recs = learn2reg_pairs(js, "registration_val", "segmentationsTr")
        lines += [
            f"\n## {len(recs)} pairs, {' x '.join(map(str, shape))} at {spacing[0]:g} mm\n",
            "| setting | EPE lungs mm | EPE liver, stomach, spleen mm | EPE kidneys mm | TRE mm | % det J <= 0 | "
            "CPU s | d lungs mm | d TRE mm |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        # every row on one pair, then the next pair: the rows of a pair run minutes apart, not a whole set apart, so
        # a slow spell of a shared machine reaches every row alike
        results: dict[str, list[dict]] = {label: [] for label, _ in ROWS[name]}
        for rec in recs:
            labels = ground_truth_labels(rec, merge)
            for label, overrides in ROWS[name]:
                settings = {**THORAX_SETTINGS, **{k: v for k, v in overrides.items() if not k.startswith("_")}}
                context = OneVoxelBasis() if overrides.get("_one_voxel_basis") else contextlib.nullcontext()
                context = Before0314() if overrides.get("_before_0314") else context
                with tempfile.TemporaryDirectory() as tmp, context:
                    disp, cpu = register_with_labels(rec, labels, settings, Path(tmp))
                results[label].append({**score(disp.numpy(), rec), "CPU s": cpu})
        first = results[ROWS[name][0][0]]
        for label, rows in results.items():
            diffs = []
            for col in ("lungs", "TRE mm"):
                d = np.array([r[col] - f[col] for r, f in zip(rows, first)])
                diffs.append(f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0:.2f}")
            means = " | ".join(f"{np.mean([r[c] for r in rows]):.2f}" for c in cols)
            lines.append(f"| {label} | {means} | {' | '.join(diffs)} |")
            print(name, lines[-1], flush=True)
    save_text("\n".join(lines) + "\n", args.md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
