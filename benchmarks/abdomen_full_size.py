"""Peak memory and time of SegReg inference on one full-size AbdomenCTCT pair (192x160x256, 14 regions).

Runs each setting in a fresh subprocess and reads its peak resident memory (CPU) or peak CUDA memory, side by side:

- ours:     regions cropped to their boxes + margin, at most ``max_batch`` regions per forward pass;
- baseline: every region on the whole grid, one region per pass (no cropping).

Usage: ``python benchmarks/abdomen_full_size.py [--device cpu|cuda] [--max_batch 1] [--max_batches 2,4] [--out DIR]``.
The synthetic pair is generated once under ``--out``; the network has random weights (memory and time do not
depend on them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = (192, 160, 256)


def one_run(data: str, device: str, crop: bool, max_batch: int) -> dict:
    import torch

    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.inferer import SegRegInferer
    from custom.io import load_nifti
    from custom.networks import segreg_unet

    rec = learn2reg_pairs(data, "training_all")[0]
    vol = {
        k: torch.as_tensor(load_nifti(rec[k])[0].astype("float32"))[None, None]
        for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")
    }
    dev = torch.device(device)
    net = segreg_unet().to(dev).eval()
    inputs = torch.cat([(vol["moving_image"] + 1000) / 2000, (vol["fixed_image"] + 1000) / 2000], 1).to(dev)
    inferer = SegRegInferer(margin=8, max_batch=max_batch, crop=crop)
    n_regions = len(torch.unique(vol["fixed_label"]))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = inferer(inputs, net, vol["fixed_label"].to(dev), vol["moving_label"].to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    return {
        "seconds": seconds,
        "peak_rss_gib": rss,
        "peak_cuda_gib": peak,
        "regions": n_regions,
        "ddf_shape": list(out["ddf"].shape),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max_batch", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench_abdomen")
    ap.add_argument("--max_batches", default=None, help="comma-separated max_batch values to add, e.g. 1,4")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.out) / "data" / "AbdomenCTCT_dataset.json"
    if args.child:
        crop, max_batch = args.child.split(",")
        print(json.dumps(one_run(str(data), args.device, crop == "crop", int(max_batch))))
        return
    if not data.exists():
        from custom.synthetic.abdomen import make_abdomen

        make_abdomen(str(data.parent), n_subjects=2, shape=SHAPE)
    results = {}
    settings = [("ours (crop, max_batch=%d)" % args.max_batch, f"crop,{args.max_batch}")]
    for mb in (args.max_batches or "").split(","):
        if mb.strip():
            settings.append(("ours (crop, max_batch=%d)" % int(mb), f"crop,{int(mb)}"))
    settings.append(("baseline (whole grid, 1 region/pass)", "full,1"))
    for name, child in settings:
        cmd = [sys.executable, __file__, "--device", args.device, "--out", args.out, "--child", child]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    r_ours, r_base = results[settings[0][0]], results[settings[-1][0]]
    key = "peak_cuda_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    print(f"\n{'setting':<40}{'time (s)':>10}{key:>16}")
    for name, r in results.items():
        print(f"{name:<40}{r['seconds']:>10.1f}{r[key]:>16.2f}")
    time_ratio, mem_ratio = r_base["seconds"] / r_ours["seconds"], r_base[key] / r_ours[key]
    print(f"ratio baseline/ours (first setting): time {time_ratio:.2f}x, memory {mem_ratio:.2f}x")


if __name__ == "__main__":
    main()
