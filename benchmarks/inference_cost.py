"""Learned inference cost: SegReg's region passes against one whole-image pass of the same backbone.

Usage: ``python benchmarks/inference_cost.py [--device cpu|cuda] [--cases acdc,abdomen]
[--abdomen_shape 96 80 128] [--max_batch 4] [--settings 'NAME' ...] [--md docs/benchmarks/inference_cost.md]``.

One pair per case, generated once under ``--work``: a synthetic ACDC pair (128 x 128 x 16, 4 regions with the
background) and a synthetic AbdomenCTCT pair of ``--abdomen_shape`` (14 regions; 192 160 256 is the full Learn2Reg
size, 512 s for the uncropped sequential setting on 2 CPU cores). Settings (:data:`SETTINGS`), each in a fresh
subprocess with the same torch threads:

- ``whole image, one pass``: the pair as one region (the one-region baseline's cost: the reference);
- ``whole grid, sequential`` / ``whole grid, batched``: every region masked on the whole grid, one or ``max_batch``
  regions per forward pass;
- ``cropped, sequential``: every region cropped to its box + 8 voxels (the bundles' ``SegRegInferer``), one region
  per pass;
- ``cropped + batched, padded to the largest``: up to ``max_batch`` crops per pass, each batch padded to its largest
  box (groups of ``max_batch``, largest box first; the inferer before ``max_padding`` grouped smallest first);
- ``cropped + batched by size``: the inferer's default, ``max_batch`` crops per pass, largest box first, but no
  pass padded by more than ``max_padding`` (0.5) of the voxels its crops need alone.

Columns: the voxels the backbone processes (every pass's batch size times its padded shape) over the grid's, wall and
CPU seconds of the inferer call (backbone, integration, composition, warping), peak resident memory
of the process and the part added by the call (GiB; CUDA: peak allocated), and the ratios of CPU seconds (CUDA: wall)
and added memory to the one-pass reference. The backbone has random weights: time and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "whole image, one pass": {"global_region": True},
    "whole grid, sequential": {"crop": False, "max_batch": 1},
    "whole grid, batched": {"crop": False},
    "cropped, sequential": {"crop": True, "max_batch": 1},
    "cropped + batched, padded to the largest": {"crop": True, "max_padding": float("inf")},
    "cropped + batched by size": {"crop": True},
}


def case_pair(case: str, work: Path, abdomen_shape) -> dict:
    """Paths of the case's pair (generated under ``work`` on first use)."""
    if case == "acdc":
        from custom.datasets.acdc import acdc_split
        from custom.synthetic.acdc import make_acdc

        root = work / "acdc"
        if not (root / "testing").is_dir():
            make_acdc(str(root), n_subjects=3, n_test=1, seed=0)
        return acdc_split(root, "test", directions=("ES_ED",))[0]
    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.synthetic.abdomen import make_abdomen

    js = work / ("abdomen_" + "x".join(map(str, abdomen_shape))) / "AbdomenCTCT_dataset.json"
    if not js.exists():
        make_abdomen(str(js.parent), n_subjects=2, shape=tuple(abdomen_shape))
    return learn2reg_pairs(js, "training_all")[0]


def resident_gib() -> float:
    """Current resident memory of this process (GiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one_run(case: str, rec: dict, device: str, setting: dict, max_batch: int) -> dict:
    import torch

    from custom.inferer import SegRegInferer
    from custom.io import load_nifti
    from custom.networks import segreg_unet

    vol = {
        k: torch.as_tensor(load_nifti(rec[k])[0].astype("float32"))[None, None]
        for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")
    }
    scale = (lambda t: t / t.max()) if case == "acdc" else (lambda t: ((t + 1000) / 2000).clamp(0, 1))
    dev = torch.device(device)
    net = segreg_unet().to(dev).eval()
    inputs = torch.cat([scale(vol["moving_image"]), scale(vol["fixed_image"])], 1).to(dev)
    labels = [vol[k].to(dev) for k in ("fixed_label", "moving_label")]
    inferer = SegRegInferer(margin=8, **{"max_batch": max_batch, **setting})
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    else:
        base = resident_gib()
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = inferer(inputs, net, *labels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    row = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    row["added_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else row["peak_gib"]) - base
    plan = inferer.plan(*labels)
    row["regions"] = len(plan.regions)
    row["network_voxels"] = network_voxels(inferer, plan) / math.prod(inputs.shape[2:])
    row["box_voxels"] = sum(math.prod(plan.box_shape(i)) for i in range(len(plan))) / math.prod(inputs.shape[2:])
    row["shape"] = list(out["ddf"].shape[2:])
    return row


def network_voxels(inferer, plan) -> int:
    """Voxels the backbone processes for ``plan``: every forward pass's batch size times its padded shape."""
    from custom.plan import padded_shape

    total = 0
    for chunk in inferer.batches(plan):
        total += len(chunk) * math.prod(padded_shape([plan.box_shape(i) for i in chunk], inferer.divisor))
    return total


def markdown(results: dict, header: str) -> str:
    lines = [
        "# Learned inference cost: SegReg's region passes against one whole-image pass\n",
        "Regenerate: `python benchmarks/inference_cost.py --md docs/benchmarks/inference_cost.md` (part of "
        "`bash benchmarks/run_all.sh`). " + header + "\n",
        "| case | setting | regions | network voxels | wall s | CPU s | peak GiB | added GiB | time ratio "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, rows in results.items():
        ref = rows["whole image, one pass"]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {case} | {name} | failed: {r['error']} | | | | | | | |")
                continue
            t = r["time"] / ref["time"]
            m = r["added_gib"] / max(ref["added_gib"], 1e-6)
            lines.append(
                f"| {case} {'x'.join(map(str, r['shape']))} | {name} | {r['regions']} | {r['network_voxels']:.2f} | "
                f"{r['wall_s']:.2f} | "
                f"{r['cpu_s']:.2f} | {r['peak_gib']:.2f} | {r['added_gib']:.2f} | {t:.2f} | {m:.2f} |"
            )
    floors = ", ".join(
        f"{rows['cropped + batched by size']['box_voxels']:.2f} on {case}"
        for case, rows in results.items()
        if "box_voxels" in rows.get("cropped + batched by size", {})
    )
    lines += ["", FOOTNOTE + (f" Without any padding: {floors}." if floors else "")]
    return "\n".join(lines) + "\n"


FOOTNOTE = (
    "The time ratio follows the network voxels. Every region's pass sees its own masked pair, and a convolutional "
    "network's output depends on its whole input, so passes cannot be merged without changing the fields. The "
    "background region's box is the whole grid (1.00), and the organ boxes add their own voxels (plus the padding to "
    "multiples of 16 that the backbone's four poolings need). The same outputs therefore cost at least the boxes' "
    "voxels over the grid's."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="acdc,abdomen")
    ap.add_argument("--abdomen_shape", type=int, nargs=3, default=(96, 80, 128))
    ap.add_argument("--max_batch", type=int, default=4, help="regions per pass of the batched settings")
    ap.add_argument("--settings", nargs="+", help="a subset of the settings, each quoted (the reference always runs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default="outputs/bench_inference")
    ap.add_argument("--md", help="also write the table as a markdown page")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        case, setting, rec = json.loads(args.child)
        print(json.dumps(one_run(case, rec, args.device, SETTINGS[setting], args.max_batch)))
        return
    import torch

    work = Path(args.work)
    names = args.settings or list(SETTINGS)
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    names = [n for n in SETTINGS if n in names or n == "whole image, one pass"]
    results = {}
    for case in args.cases.split(","):
        rec = case_pair(case, work, args.abdomen_shape)
        results[case] = {}
        for name in names:
            cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads)]
            cmd += ["--max_batch", str(args.max_batch), "--child", json.dumps([case, name, rec])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                results[case][name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["time"] = r["wall_s"] if args.device.startswith("cuda") else r["cpu_s"]
                results[case][name] = r
            print(case, name, results[case][name], flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU"
    header = (
        f"torch {torch.__version__}, device {args.device} ({gpu}), {args.threads} torch threads, {os.cpu_count()} "
        f"CPUs; batched settings: {args.max_batch} regions per pass; every setting in a fresh process. Time ratio: "
        f"{'wall' if args.device.startswith('cuda') else 'CPU'} seconds over the one-pass reference; memory ratio: "
        "the memory the call added (CUDA: peak allocated) over the reference's. Random backbone weights."
    )
    page = markdown(results, header)
    print(page)
    if args.md:
        from custom.io import save_text

        save_text(page, args.md)


if __name__ == "__main__":
    main()
