"""Iterative SegReg against ConvexAdam, side by side on the same pairs: CPU and wall seconds, peak memory, accuracy.

Usage: ``pip install -e ".[bench]" && python benchmarks/iterative_speed.py [--out DIR] [--threads N] [--skip_large]``.

Cases (generated on first use, cached under ``--out``):

- ``thorax_80x64x64``: the synthetic ThoraxCBCT validation pair (4 mm voxels), as ``python -m custom make-data``;
- ``thorax_390x280x300``: a synthetic ThoraxCBCT pair the size of the real one (1 mm voxels, structured anatomy
  with lung texture and sliding breathing motion).

Methods: IterativeSegReg per region and global with the ``segreg_thorax`` bundle's own settings (read from its
``inference.json``), ConvexAdam (``convexadam`` from PyPI, its defaults: MIND-SSC, coupled convex optimisation,
80 Adam steps at half resolution) and ANTs SyN (``antspyx``, ``benchmarks/peers.py``: its defaults, mutual
information, iterations (40, 20, 0), so its last level is at half resolution; as many ITK threads as torch threads).
Each method runs in a fresh process (so the peak memory is its own) with the same number of threads. Columns: CPU
seconds of the registration call (all threads together), wall seconds, peak resident memory of the process (GiB),
mean Dice of the regions of the bundle's default ``region_set`` (%), TRE over the lung keypoints (mm) and end-point
error against the exact motion (mm, all voxels). The last lines are the ratios of CPU seconds, per-region SegReg over
each peer, per case (``ratio_segreg_vs_<peer>[<case>]=<x>``), and ``ratio_segreg_vs_convexadam=<x>`` (the larger of
the two cases).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "segreg_thorax"
CASES = {"thorax_80x64x64": ((80, 64, 64), (4.0, 4.0, 4.0), 2), "thorax_390x280x300": ((390, 280, 300), (1.0,) * 3, 1)}
METHODS = ("segreg", "global", "convexadam", "ants_syn")
PEER_NAMES = {"convexadam": "ConvexAdam", "ants_syn": "ANTs SyN"}


def case_record(out: Path, name: str) -> dict:
    """The validation pair of case ``name`` (generated into ``out/name`` on first use)."""
    from synthetic_sets import in_child_process

    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.synthetic.thorax import make_thorax

    shape, spacing, n_subjects = CASES[name]
    js = out / name / "ThoraxCBCT_dataset.json"
    if not js.exists():
        print(f"generating {name} in {js.parent} ...", flush=True)
        in_child_process(make_thorax, str(js.parent), n_subjects=n_subjects, shape=shape, spacing=spacing)
    return learn2reg_pairs(js, "registration_val", "segmentationsTr")[0]


def load_pair(rec: dict):
    """Images scaled as the bundle does (-1000..1000 HU -> 0..1), label maps merged with the bundle's default region
    set (its ``merge_map``), spacing, keypoints, truth, the region ids of the set."""
    import torch

    from custom.datasets.learn2reg import read_keypoints
    from custom.io import load_nifti
    from custom.regions import load_merge_map, merge_labels

    mapping = load_merge_map(bundle_config().get_parsed_content("merge_map"))["map"]
    fixed, affine = load_nifti(rec["fixed_image"])
    moving = load_nifti(rec["moving_image"])[0]
    fl, ml = (merge_labels(load_nifti(rec[k])[0], mapping, "ignore") for k in ("fixed_label", "moving_label"))

    def tensor(a, scale=False):  # C-ordered, as the bundle's collated batches are (a NIfTI array is Fortran-ordered)
        t = torch.as_tensor(np.ascontiguousarray(a, np.float32))[None, None]
        return ((t + 1000) / 2000).clamp(0, 1) if scale else t

    truth = load_nifti(rec["true_displacement"])[0] if rec.get("true_displacement") else None
    return {
        "fixed": tensor(fixed, True),
        "moving": tensor(moving, True),
        "fixed_label": tensor(fl),
        "moving_label": tensor(ml),
        "spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "keypoints": [read_keypoints(rec[k]) for k in ("fixed_keypoints", "moving_keypoints")],
        "truth": None if truth is None else np.moveaxis(truth, -1, 0),
        "ids": sorted(set(mapping.values()) - {0}),
    }


def bundle_config(variant: str = "segreg"):
    """The ``segreg_thorax`` bundle's inference config, parsed (progress bar off, ``variant`` set)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["variant"] = variant
    parser["progress"] = False
    parser.get_parsed_content("imports")
    return parser


def bundle_solver(variant: str):
    """The ``segreg_thorax`` bundle's IterativeSegReg, built from its inference config."""
    return bundle_config(variant).get_parsed_content("inferer").optimiser


def register(method: str, pair: dict, device) -> tuple:
    """Displacement ``(1, 3, *S)`` (voxels, Learn2Reg sense, on the CPU) of ``method`` on ``pair``, and the CPU
    seconds per phase of the SegReg solver (``IterativeSegReg.last_profile``; empty for ConvexAdam)."""
    import torch

    if method == "convexadam":
        from convexAdam.convex_adam_MIND import convex_adam_pt

        disp = convex_adam_pt(pair["fixed"][0, 0], pair["moving"][0, 0], device=device)
        return torch.as_tensor(np.moveaxis(disp, -1, 0), dtype=torch.float32)[None], {}
    if method == "ants_syn":
        from peers import ants_syn

        images = [pair[k][0, 0].numpy() for k in ("fixed", "moving")]
        disp = ants_syn(*images, pair["spacing"], threads=torch.get_num_threads())
        return torch.as_tensor(disp)[None], {}
    solver = bundle_solver("segreg" if method == "segreg" else "global")
    args = [pair[k].to(device) for k in ("fixed", "moving", "fixed_label", "moving_label")]
    return solver(*args, spacing=pair["spacing"])["ddf"].cpu(), dict(solver.last_profile)


def worker(method: str, rec: dict, threads: int, device: str = "cpu") -> dict:
    """Run one method on one pair in this process; returns its row."""
    import torch

    from custom.evaluation import epe_metrics
    from custom.metrics import dice_per_label, tre_mm, warp_labels

    torch.set_num_threads(threads)
    dev = torch.device(device)
    pair = load_pair(rec)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    ddf, phases = register(method, pair, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    row = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "phases": phases}
    row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if dev.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ids = pair["ids"]
    dice = dice_per_label(warp_labels(pair["moving_label"], ddf), pair["fixed_label"], ids, pair["moving_label"])
    row["dice"] = float(np.nanmean(dice.numpy()))
    row["tre_mm"] = float(tre_mm(ddf, *pair["keypoints"], pair["spacing"]).mean())
    if pair["truth"] is not None:
        row["epe_mm"] = epe_metrics(ddf[0].numpy(), pair["truth"], np.diag(pair["spacing"] + [1.0]))["epe_mm"]
    return row


def run_isolated(method: str, rec: dict, threads: int, device: str) -> dict:
    """``worker`` in a fresh Python process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--worker", method, "--record", json.dumps(rec), "--threads", str(threads)]
    cmd += ["--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], ratios: dict, header: str) -> str:
    """The results as the markdown page ``docs/benchmarks/iterative_speed.md``."""
    lines = [
        "# Iterative SegReg vs ConvexAdam and ANTs SyN\n",
        'Regenerate: `pip install -e ".[bench]" && python benchmarks/iterative_speed.py --md '
        "docs/benchmarks/iterative_speed.md`. " + header + "\n",
        "| case | method | CPU s | wall s | peak GiB | Dice % | TRE mm | EPE mm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['method']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['dice']:.2f} | {r['tre_mm']:.2f} | {r.get('epe_mm', float('nan')):.2f} |"
        )
    lines.append("")
    lines.append(
        "SegReg registers with the ground-truth label maps, so its Dice is partly circular; TRE (lung keypoints) and "
        "EPE (all voxels, against the exact motion) are the fair measures. ConvexAdam and ANTs SyN run their defaults, "
        "without masks; ANTs' last level is at half resolution (8 mm on the 4 mm pair, 2 mm on the 1 mm one), SegReg's "
        "at 4 mm on both."
    )
    lines.append("")
    lines += [
        f"- `ratio_segreg_vs_{peer}[{case}]={v:.2f}` (CPU seconds, per-region SegReg / {PEER_NAMES[peer]})"
        for (peer, case), v in ratios.items()
    ]
    profiled = [r for r in rows if r["method"] == "segreg" and r.get("phases")]
    if profiled:
        lines += [
            "",
            "## Where per-region SegReg spends its CPU time",
            "",
            "CPU seconds per phase of the same runs (`IterativeSegReg.last_profile`); the rest of the CPU s column is "
            "the process's start-up inside the timed call (first use of the thread pool and kernels).",
            "",
            "| case | " + " | ".join(profiled[0]["phases"]) + " |",
            "|---|" + "---|" * len(profiled[0]["phases"]),
        ]
        for r in profiled:
            lines.append(
                f"| {r['case']} | " + " | ".join(f"{r['phases'].get(k, 0.0):.2f}" for k in profiled[0]["phases"]) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_iterative", help="where the generated cases are cached")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every method")
    ap.add_argument("--skip_large", action="store_true", help="only the 80 x 64 x 64 case")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--md", help="also write the results as a markdown page (e.g. docs/benchmarks/iterative_speed.md)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ConvexAdam then runs in its default float16)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.record), args.threads, args.device)))
        return
    import torch

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, device {args.device} ({gpu}), {args.threads} threads, {os.cpu_count()} CPUs")
    names = [n for n in CASES if not (args.skip_large and n != "thorax_80x64x64")]
    rows = []
    for name in names:
        rec = case_record(Path(args.out), name)
        for method in args.methods:
            row = {"case": name, "method": method, **run_isolated(method, rec, args.threads, args.device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\n{'case':<22}{'method':<12}{'CPU s':>9}{'wall s':>9}{'peak GiB':>10}{'Dice %':>8}{'TRE mm':>8}{'EPE mm':>8}",
        end="",
    )
    print(f"{'GPU GiB':>9}" if args.device.startswith("cuda") else "")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22}{r['method']:<12} failed: {r['error']}")
            continue
        print(
            f"{r['case']:<22}{r['method']:<12}{r['cpu_s']:>9.1f}{r['wall_s']:>9.1f}{r['peak_gib']:>10.2f}"
            f"{r['dice']:>8.2f}{r['tre_mm']:>8.2f}{r.get('epe_mm', float('nan')):>8.2f}"
            + (f"{r['peak_gpu_gib']:>9.2f}" if "peak_gpu_gib" in r else "")
        )
    ratios = {}
    for peer in PEER_NAMES:
        for name in names:
            by = {r["method"]: r for r in rows if r["case"] == name and "error" not in r}
            if "segreg" in by and peer in by:
                ratios[peer, name] = by["segreg"]["cpu_s"] / by[peer]["cpu_s"]
                print(f"ratio_segreg_vs_{peer}[{name}]={ratios[peer, name]:.2f}")
    if args.md:
        header = (
            f"torch {torch.__version__}, device {args.device} ({gpu}), {args.threads} torch threads, "
            f"{os.cpu_count()} CPUs; every method in a fresh process; CPU s = all threads together; peak = the "
            "process's resident memory (data included). SegReg runs the `segreg_thorax` bundle's settings."
        )
        from custom.io import save_text

        save_text(markdown(rows, ratios, header), args.md)
    convexadam = [v for (peer, _), v in ratios.items() if peer == "convexadam"]
    if convexadam:
        print(f"ratio_segreg_vs_convexadam={max(convexadam):.2f}")


if __name__ == "__main__":
    main()
