"""SegReg against its peers on the synthetic sets, one scorer for every method: accuracy, field quality, cost.

Usage: ``pip install -e ".[bench]" && python benchmarks/peer_accuracy.py [--data data/bench_synthetic]
[--out docs/benchmarks] [--sets acdc,thorax,abdomen] [--methods ...] [--threads N]``.

Sets (generated with the ``make-data`` defaults if absent): ACDC-like cine MR (8 ES -> ED pairs, 1.8 x 1.8 x 10 mm),
ThoraxCBCT (2 CBCT -> FBCT validation pairs, 4 mm, 13 merged regions, lung keypoints) and AbdomenCTCT (2
inter-subject test pairs, 2 mm, 13 organs). Every pair stores its exact motion.

Methods (:data:`METHODS`), all training-free, each set's own settings for SegReg (``synthetic_sets.synthetic_set``):

- ``truth``: the stored exact motion itself (the ceiling of every column: inter-subject organs differ in shape, so
  the Dice of the labels it warps stays below 100 %);
- ``none``: the zero displacement;
- ``segreg_box`` / ``segreg_region``: iterative SegReg with the ground-truth label maps, each region's field
  regularised over its box or only inside its mask (``reg_domain``);
- ``segreg_noisy``: ``segreg_region`` given degraded label maps (``custom.degrade`` boundary noise of
  :data:`NOISE_MM` mm, fixed and moving independently), the stand-in for an automatic segmentation;
- ``global``: the same solver with one region (the whole image);
- ``convexadam``, ``ants_syn``, ``elastix_bspline``: the peers of ``benchmarks/peers.py`` (their documented
  settings there), given the set's field-of-view/body masks where it has them (thorax: voxels above -1000 HU;
  abdomen: the Learn2Reg ``masksTr``); ACDC has none. The ``*_nomask`` rows run the same peers without masks.

Every method runs in a fresh process per set (its peak resident memory is its own) with the same torch threads.
Scores (``synthetic_sets.score_displacement``): end-point error (mm) against the exact motion over all voxels,
averaged per region (every region weighs the same) and in the 2-voxel band around region borders; TRE over the lung
keypoints (thorax); Dice and HD95 of the ground-truth labels warped by the displacement (circular for SegReg, which
registers with them); SDlogJ; %
det J <= 0; CPU and wall seconds per pair; peak resident memory (GiB, the process: interpreter and libraries
included). Writes ``<out>/peer_accuracy.md`` and one boxplot PNG per set (EPE per region and pair, per method).
Per-set results are cached as JSON under ``--cache``; ``--fresh`` reruns them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
METHODS = {
    "truth": "true motion (reference)",
    "none": "no registration",
    "segreg_box": "SegReg per region (box)",
    "segreg_region": "SegReg per region (region)",
    "segreg_noisy": "SegReg (region), noisy labels",
    "global": "global (one region)",
    "convexadam": "ConvexAdam",
    "ants_syn": "ANTs SyN",
    "elastix_bspline": "elastix B-spline",
    "convexadam_nomask": "ConvexAdam, no mask",
    "ants_syn_nomask": "ANTs SyN, no mask",
    "elastix_bspline_nomask": "elastix B-spline, no mask",
}
MASKED_SETS = ("thorax", "abdomen")  # the '_nomask' rows run where a set has masks
SEGREG = {"segreg_box": {"reg_domain": "box"}, "segreg_region": {"reg_domain": "region"}}
NOISE_MM = 2.0
# ConvexAdam's default grid spacing (6 voxels) leaves too few control points across ACDC's 16 slices (it crashes)
PEER_KWARGS = {"acdc": {"convexadam": {"grid_sp": 4}}}
COLUMNS = {
    "epe_mm": "EPE mm",
    "epe_region_mm": "EPE per region mm",
    "epe_border_mm": "EPE border mm",
    "tre_mm": "TRE mm",
    "dice": "Dice %",
    "hd95_mm": "HD95 mm",
    "sdlogj": "SDlogJ",
    "folds_percent": "% det J <= 0",
    "cpu_s": "CPU s",
    "wall_s": "wall s",
    "peak_gib": "peak GiB",
}


def scaled(path: str, modality: str) -> np.ndarray:
    """The image as the peers see it: CT windowed to -1000..1000 HU -> 0..1; MR divided by its 99.5th percentile."""
    a = nib.load(path).get_fdata().astype(np.float32)
    if modality == "ct":
        return np.clip((a + 1000.0) / 2000.0, 0.0, 1.0)
    return np.clip(a / max(float(np.percentile(a, 99.5)), 1e-6), 0.0, 1.5)


def masks(name: str, rec: dict):
    """The set's fixed and moving field-of-view/body masks (bool arrays), or ``(None, None)``."""
    if name == "thorax":  # CBCT padding outside the field of view and the air around the body are -1000 HU
        return tuple(nib.load(rec[k]).get_fdata() > -1000.0 for k in ("fixed_image", "moving_image"))
    if name == "abdomen":
        paths = [Path(rec[k].replace("imagesTr", "masksTr")) for k in ("fixed_image", "moving_image")]
        return tuple(nib.load(p).get_fdata() > 0 for p in paths)
    return None, None


def displacement(method: str, name: str, rec: dict, settings, merge, tmp: Path, **peer_kwargs) -> np.ndarray:
    """Displacement ``(3, *S)`` (voxels of the fixed grid, Learn2Reg sense) of ``method`` on the pair ``rec``;
    ``peer_kwargs`` go to the peer (e.g. ANTs' ``reg_iterations``) on top of the set's ``PEER_KWARGS``."""
    from synthetic_sets import ground_truth_labels, register_with_labels

    from custom.degrade import degrade_labels

    fixed_img = nib.load(rec["fixed_image"])
    if method == "none":
        return np.zeros((3,) + fixed_img.shape, np.float32)
    if method == "truth":  # the stored exact motion, scored like a method: the ceiling of every column
        return np.moveaxis(nib.load(rec["true_displacement"]).get_fdata().astype(np.float32), -1, 0)
    if method in ("segreg_box", "segreg_region", "segreg_noisy", "global"):
        labels = ground_truth_labels(rec, merge)
        if method == "segreg_noisy":
            spacing = fixed_img.header.get_zooms()[:3]
            labels = {
                key: degrade_labels(labels[key], "noise", NOISE_MM, spacing, seed=k)
                for k, key in enumerate(("fixed_label", "moving_label"))
            }
        extra = {"global_region": True} if method == "global" else SEGREG.get(method, SEGREG["segreg_region"])
        return register_with_labels(rec, labels, {**settings, **extra}, tmp)[0].numpy()
    from peers import run_peer

    moving_img = nib.load(rec["moving_image"])
    if moving_img.shape != fixed_img.shape or not np.allclose(moving_img.affine, fixed_img.affine, atol=1e-3):
        raise ValueError(f"the peers need both images on one grid: {rec['fixed_image']} / {rec['moving_image']}")
    modality = "mr" if name == "acdc" else "ct"
    fixed, moving = (scaled(rec[k], modality) for k in ("fixed_image", "moving_image"))
    spacing = np.linalg.norm(fixed_img.affine[:3, :3], axis=0)
    peer = method.removesuffix("_nomask")
    kwargs = {**PEER_KWARGS.get(name, {}).get(peer, {}), **peer_kwargs}
    if peer == "ants_syn":  # ITK threads = the torch threads of the other methods
        import torch

        kwargs["threads"] = torch.get_num_threads()
    fov = (None, None) if method.endswith("_nomask") else masks(name, rec)
    return run_peer(peer, fixed, moving, spacing, *fov, **kwargs)


def worker(name: str, method: str, data: Path, threads: int) -> dict:
    """Every pair of set ``name`` registered by ``method`` in this process: per-pair rows and the peak memory."""
    import torch
    from synthetic_sets import score_displacement, synthetic_set

    torch.set_num_threads(threads)
    recs, ids, settings, merge = synthetic_set(name, data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rec in recs:
            w0, c0 = time.perf_counter(), time.process_time()
            disp = displacement(method, name, rec, settings, merge, Path(tmp))
            cost = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
            rows.append({**score_displacement(rec, disp, ids, merge), **cost})
    return {"rows": rows, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_isolated(name: str, method: str, data: Path, threads: int) -> dict:
    """``worker`` in a fresh process; ``{"error": last line of its stderr}`` if it fails."""
    cmd = [sys.executable, __file__, "--worker", name, method, "--data", str(data), "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(result: dict) -> dict:
    """Means over the pairs of every column (peak memory: the process's)."""
    rows = result["rows"]
    out = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS if c != "peak_gib" and c in rows[0]}
    out["peak_gib"] = result["peak_gib"]
    return out


def boxplot(name: str, results: dict, path: Path) -> None:
    """EPE per region and pair (mm, log axis), one box per method (the truth, all zeros, left out)."""
    from plots import method_boxplot

    values = {
        METHODS[m]: [v for r in res["rows"] for v in r["epe_regions"].values()]
        for m, res in results.items()
        if "error" not in res and m != "truth"
    }
    method_boxplot(values, "EPE per region and pair (mm)", f"{name}: end-point error per region and pair", path, True)


def table(name: str, results: dict, n_pairs: int) -> str:
    cols = [c for c in COLUMNS if any(c in summary(r) for r in results.values() if "error" not in r)]
    lines = [f"### {name} ({n_pairs} pairs)\n", "| method | " + " | ".join(COLUMNS[c] for c in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for method, res in results.items():
        if "error" in res:
            lines.append(f"| {METHODS[method]} | failed: {res['error']} |" + " |" * (len(cols) - 1))
            continue
        s = summary(res)
        lines.append(f"| {METHODS[method]} | " + " | ".join(f"{s[c]:.2f}" if c in s else "-" for c in cols) + " |")
    return "\n".join(lines) + f"\n\n![{name}](peer_accuracy_{name}.png)\n"


HEADER = """# SegReg against its peers on the synthetic sets

Regenerate: `pip install -e ".[bench]" && python benchmarks/peer_accuracy.py` (part of `bash benchmarks/run_all.sh`).
{env}. Means over the pairs; every method in a fresh process per set with the same threads (elastix: one thread, its
build segfaults with two); CPU s = all threads together; peak GiB = the process's resident memory (interpreter and
libraries included). One scorer for every method (`score_displacement` in `benchmarks/synthetic_sets.py`): EPE
against the exact motion over all voxels, per labelled region (the mean of the regions' means: every region weighs
the same, the background is left
out) and in the 2-voxel band around region borders; TRE over the lung keypoints (thorax only); Dice and HD95 of the
ground-truth labels warped by the displacement; SDlogJ and % det J <= 0 of the displacement. The first row scores the
stored true motion itself: the synthetic truths slide at organ borders (folds) and, on the abdomen, organs differ in
shape between subjects (Dice 68 %).

All methods are training-free (the learned comparison is `learned_accuracy.md`). Dice and HD95 are circular for
SegReg, which registers with the very labels they score; EPE and TRE are the fair measures. 'noisy labels' gives
SegReg label maps degraded by {noise} mm of independent boundary noise (`custom.degrade`; segmentation Dice about 93 %
on ACDC, see `segmentation_quality.md`). 'global' is SegReg's solver with one region. The peers get the thorax's
voxels above -1000 HU (the CBCT field of view and the body) and the abdomen's Learn2Reg body masks; ACDC has none;
the 'no mask' rows run them without. Peer settings (`benchmarks/peers.py`): ConvexAdam defaults (grid spacing 4 on
ACDC's 16 slices, where 6 crashes), ANTs `SyNOnly` with antspyx defaults (mutual information; the pairs share one
space, so no affine stage), elastix's default B-spline map (mutual information + bending energy; the fixed mask
only: with both masks it stops on samples outside the moving mask).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench_synthetic")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--cache", default="outputs/bench_peers", help="per set and method results (JSON)")
    ap.add_argument("--sets", default="acdc,thorax,abdomen")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fresh", action="store_true", help="ignore cached results")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if args.worker:
        print(json.dumps(worker(*args.worker, data, args.threads)))
        return
    import torch
    from synthetic_sets import synthetic_set

    from custom.io import save_json, save_text

    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = f"torch {torch.__version__}, {args.threads} torch threads, {os.cpu_count()} CPUs, no GPU"
    parts = [HEADER.format(env=env, noise=NOISE_MM)]
    for name in args.sets.split(","):
        n_pairs = len(synthetic_set(name, data)[0])
        results = {}
        for method in args.methods.split(","):
            if method.endswith("_nomask") and name not in MASKED_SETS:
                continue
            path = cache / f"{name}_{method}.json"
            if path.is_file() and not args.fresh:
                results[method] = json.loads(path.read_text())
            else:
                results[method] = run_isolated(name, method, data, args.threads)
                if "error" not in results[method]:
                    save_json(results[method], path)
            res = results[method]
            print(name, method, res.get("error") or {k: round(v, 3) for k, v in summary(res).items()}, flush=True)
        boxplot(name, results, out / f"peer_accuracy_{name}.png")
        parts.append(table(name, results, n_pairs))
    save_text("\n".join(parts), out / "peer_accuracy.md")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
