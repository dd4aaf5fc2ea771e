"""Learned SegReg against VoxelMorph on synthetic cine MR, every network trained here with the same budget.

Usage: ``pip install -e ".[bench]" && python benchmarks/learned_accuracy.py [--epochs 15] [--out docs/benchmarks]``.

The ``segreg_acdc`` bundle's own train / inference / evaluate configs (through ``python -m custom``'s
``run_bundle``, the CPU-sized settings of ``python -m custom demo``: a synthetic ACDC set of 6 training + 2 test
patients, volumes resampled to 3.6 x 3.6 x 10 mm, 64 x 64 x 16, learning rate 1e-3, ``--epochs`` epochs) train and
score:

- the SegReg variants ``dice``, ``edt`` and ``edt_dice`` (one shared backbone, per-region pairs);
- ``baseline``: the same backbone on the whole images (one region), the bundle's baseline variant;
- ``voxelmorph``: VoxelMorph's own network (``voxelmorph`` 0.3 from PyPI, ``benchmarks/voxelmorph_net.py``) in place
  of the backbone (``network_def`` override), trained as the baseline variant: the same data, loss (MSE + 0.1 Dice +
  0.01 diffusion: VoxelMorph's semi-supervised setting), optimiser, epochs and velocity integration.

Each model is scored on the held-out test pairs by the bundle's evaluation (Dice and HD95 of the ground-truth
labels, EPE against the exact motion of the ES -> ED pairs: all voxels, labelled voxels, border band; SDlogJ;
% det J <= 0). The SegReg variants are scored a second time with noisy
label maps at inference (``custom.degrade`` boundary noise of ``--noise_mm`` mm, fixed and moving independently,
through the bundle's ``label_dir``; the ground truth still scores). Training and evaluation CPU seconds are
measured in this process. Writes ``<out>/learned_accuracy.md`` and a boxplot of the EPE per structure and pair
(``learned_accuracy.png``); models and runs go under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "segreg_acdc"
METHODS = {
    "edt_dice": "SegReg EDT & Dice",
    "dice": "SegReg Dice",
    "edt": "SegReg EDT",
    "baseline": "baseline (one region)",
    "voxelmorph": "VoxelMorph (voxelmorph 0.3)",
}
SEGREG = ("edt_dice", "dice", "edt")
COLUMNS = {
    "epe_mm": "EPE mm",
    "epe_labelled_mm": "EPE labelled mm",
    "epe_border_mm": "EPE border mm",
    "dice_mean": "Dice %",
    "hd95_mean": "HD95 mm",
    "sdlogj": "SDlogJ",
    "neg_jac_percent": "% det J <= 0",
    "train_cpu_s": "train CPU s",
    "eval_cpu_s_per_pair": "eval CPU s / pair",
    "parameters": "parameters",
}


NOT_STRUCTURES = ("epe_mm", "epe_labelled_mm", "epe_border_mm")


def boxplot(rows: dict, path: Path) -> None:
    """EPE per structure and pair (mm), one box per model (and label source)."""
    from plots import method_boxplot

    values = {label(k): r["epe_structures"] for k, r in rows.items()}
    method_boxplot(values, "EPE per structure and pair (mm)", "learned models, synthetic cine MR", path)


def overrides(method: str, train: bool) -> dict:
    """Config overrides that make ``method`` a variant of the bundle (VoxelMorph: the baseline's settings, its own
    network)."""
    if method != "voxelmorph":
        return {"variant": method}
    configs = json.loads((BUNDLE / "configs" / ("train.json" if train else "inference.json")).read_text())
    return {
        "variant": "voxelmorph",
        "variants#voxelmorph": configs["variants"]["baseline"],
        "network_def": {"_target_": "voxelmorph_net.VxmVelocityNet", "spatial_dims": 3},
    }


def noisy_labels(data: Path, target: Path, amount_mm: float) -> Path:
    """Every test frame's ground-truth label map degraded by boundary noise, as ``label_dir`` files."""
    from custom.degrade import degrade_labels

    target.mkdir(parents=True, exist_ok=True)
    for k, gt in enumerate(sorted((data / "testing").glob("patient*/patient*_frame*_gt.nii.gz"))):
        img = nib.load(gt)
        lab = np.rint(img.get_fdata()).astype(np.int16)
        noisy = degrade_labels(lab, "noise", amount_mm, img.header.get_zooms()[:3], seed=k)
        nib.save(nib.Nifti1Image(noisy.astype(np.int16), img.affine), target / gt.name.replace("_gt", ""))
    return target


def evaluate(method: str, work: Path, common: dict, name: str, label_dir: Path | None = None) -> dict:
    """The bundle's evaluation of ``method``'s checkpoint: summary means and CPU seconds per pair."""
    from custom.__main__ import run_bundle

    configs = BUNDLE / "configs"
    out = work / "eval" / name
    c0 = time.process_time()
    run_bundle(
        [str(configs / "inference.json"), str(configs / "evaluate.json")],
        "eval",
        output_dir=str(out),
        label_dir=None if label_dir is None else str(label_dir),
        **{"writer#save_figures": False, "save_warped": False},
        **overrides(method, train=False),
        **common,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    row = {k: v["mean"] for k, v in metrics["summary"].items()}
    structures = [k for k in metrics["summary"] if k.startswith("epe_") and k not in NOT_STRUCTURES]
    row["epe_structures"] = [c[k] for c in metrics["cases"] for k in structures if k in c]
    row["eval_cpu_s_per_pair"] = (time.process_time() - c0) / max(len(metrics["cases"]), 1)
    return row


def split_key(key: str) -> tuple[str, int]:
    """``"baseline_x4"`` -> ``("baseline", 4)``: the method and its multiple of the common epochs."""
    method, _, factor = key.partition("_x")
    return method, int(factor or 1)


def label(key: str) -> str:
    """The table's name of a result key (``<method>[_x<k>][_noisy]``)."""
    noisy = key.endswith("_noisy")
    method, factor = split_key(key.removesuffix("_noisy"))
    return METHODS[method] + (f", {factor}x epochs" if factor > 1 else "") + (", noisy labels" if noisy else "")


def train_and_score(key: str, epochs: int, work: Path, common: dict, noisy: Path) -> dict:
    """Train ``key``'s model with the bundle and score it (and, for SegReg, again with noisy labels)."""
    import torch

    from custom.__main__ import run_bundle

    method, factor = split_key(key)
    common = {**common, "ckpt_dir": str(work / "models" / key)}
    c0, w0 = time.process_time(), time.perf_counter()
    print(f"== training {key} ({epochs * factor} epochs) ==", flush=True)
    run_bundle(
        str(BUNDLE / "configs" / "train.json"),
        "train",
        epochs=epochs * factor,
        val_interval=max(1, epochs // 3),
        learning_rate=1e-3,
        overwrite=True,
        output_dir=str(work / "runs" / key),
        seed=0,
        **overrides(method, train=True),
        **common,
    )
    cost = {"train_cpu_s": time.process_time() - c0, "train_wall_s": time.perf_counter() - w0}
    state = torch.load(Path(common["ckpt_dir"]) / f"model_{method}.pt", map_location="cpu", weights_only=False)
    cost["parameters"] = sum(v.numel() for v in state.get("model", state).values() if hasattr(v, "numel"))
    rows = {key: {**evaluate(method, work, common, key), **cost}}
    if method in SEGREG:
        rows[f"{key}_noisy"] = {**evaluate(method, work, common, f"{key}_noisy", noisy), **cost}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--noise_mm", type=float, default=2.0)
    ap.add_argument("--work", default="outputs/bench_learned")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument(
        "--methods",
        default=",".join(list(METHODS) + ["baseline_x4", "voxelmorph_x4"]),
        help="comma-separated; '<method>_x<k>' trains for k times the epochs",
    )
    ap.add_argument("--fresh", action="store_true", help="retrain models whose results are cached under --work")
    args = ap.parse_args()
    import torch

    from custom.io import save_json, save_text
    from custom.synthetic.acdc import make_acdc

    work = Path(args.work).resolve()
    data = work / "data"
    if not (data / "testing").is_dir():
        make_acdc(str(data), n_subjects=6, n_test=2, seed=0)
    noisy = noisy_labels(data, work / "noisy_labels", args.noise_mm)
    common = dict(
        bundle_root=str(BUNDLE),
        dataset_dir=str(data),
        pixdim=[3.6, 3.6, 10.0],
        spatial_size=[64, 64, 16],
        num_workers=0,
    )
    rows = {}
    for key in args.methods.split(","):
        cached = work / "rows" / f"{key}.json"
        if cached.is_file() and not args.fresh:
            rows.update(json.loads(cached.read_text()))
        else:
            new = train_and_score(key, args.epochs, work, common, noisy)
            save_json(new, cached)
            rows.update(new)
        print(key, {k: round(v, 3) for k, v in rows[key].items() if k in COLUMNS}, flush=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows.values())]
    lines = [
        "# Learned SegReg against VoxelMorph (synthetic cine MR)\n",
        'Regenerate: `pip install -e ".[bench]" && python benchmarks/learned_accuracy.py` (part of '
        f"`bash benchmarks/run_all.sh`). torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, no GPU. Every network trained here by the `segreg_acdc` bundle with one budget: "
        f"{args.epochs} epochs on the synthetic set of `python -m custom demo` (6 training patients, both directions; "
        "64 x 64 x 16 at 3.6 x 3.6 x 10 mm; Adam, learning rate 1e-3; MSE + mask loss + diffusion; 7 scaling-and-"
        "squaring steps; in-plane field, so no through-plane motion for any of them). VoxelMorph is the "
        "`voxelmorph` 0.3 network (UNet 16-32-32-32) trained "
        "as the baseline variant (whole images, MSE + 0.1 Dice + 0.01 diffusion). Means over the 4 test pairs "
        "(2 held-out patients, ES -> ED and ED -> ES; EPE on the ES -> ED pairs that store the exact motion). "
        f"'noisy labels': the same model given label maps with {args.noise_mm:g} mm of boundary noise at inference "
        "(scored on the ground truth). Dice and HD95 are partly circular for SegReg, which sees the labels at "
        "inference; EPE is the fair measure. Train CPU s counts validation too; SegReg trains on all 4 region pairs "
        "of each image pair per step (`regions_per_pair`), so one epoch costs it about 4x the CPU of a one-region "
        "model; the '4x epochs' rows give the one-region models that CPU budget.\n",
        "| method | " + " | ".join(COLUMNS[c] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for key, r in rows.items():
        name = label(key)
        cells = [f"{r[c]:.0f}" if c == "parameters" else (f"{r[c]:.2f}" if c in r else "-") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\n![learned](learned_accuracy.png)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boxplot(rows, out / "learned_accuracy.png")
    save_text("\n".join(lines) + "\n", out / "learned_accuracy.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
