"""CPU vs CUDA, side by side in one run: the iterative mode on a synthetic thorax pair and the trained inferer on a
full-size abdomen pair.

Usage: ``python benchmarks/gpu_timings.py [--out DIR] [--thorax_shape 80 64 64] [--abdomen_shape 192 160 256]``.

For each device it prints wall seconds, process CPU seconds, peak memory (CPU: process peak RSS so far; CUDA:
``max_memory_allocated``), and for the iterative runs Dice and TRE against the pair's ground truth, so the two devices
can be compared for speed *and* agreement. The thorax settings are the ``segreg_thorax`` bundle's defaults. The
inferer uses random weights (time and memory do not depend on them). Without CUDA only the CPU rows are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def measure(fn, device: torch.device) -> tuple[dict, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    if device.type == "cuda":
        stats["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        stats["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return stats, out


def thorax_case(out: Path, shape) -> dict:
    """The synthetic thorax validation pair of ``shape`` as ``iterative_speed.load_pair`` reads it."""
    from iterative_speed import load_pair

    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.synthetic.thorax import make_thorax

    js = out / "thorax" / "ThoraxCBCT_dataset.json"
    if not js.exists():
        make_thorax(str(js.parent), n_subjects=2, shape=tuple(shape))
    return load_pair(learn2reg_pairs(js, "registration_val", "segmentationsTr")[0])


def iterative_rows(case: dict, device: torch.device) -> list[dict]:
    from iterative_speed import bundle_solver

    from custom.metrics import dice_per_label, tre_mm, warp_labels

    rows = []
    for mode, variant in (("per-region", "segreg"), ("global", "global")):
        reg = bundle_solver(variant)  # the segreg_thorax bundle's own settings
        args = [case[k].to(device) for k in ("fixed", "moving", "fixed_label", "moving_label")]
        stats, out = measure(lambda: reg(*args, spacing=case["spacing"]), device)
        ddf = out["ddf"].cpu()
        ids = [i for i in range(1, 14)]
        dice = dice_per_label(warp_labels(case["moving_label"], ddf), case["fixed_label"], ids, case["moving_label"])
        stats["dice_mean"] = float(np.nanmean(dice.numpy()))
        stats["tre_mm"] = float(tre_mm(ddf, *case["keypoints"], case["spacing"]).mean())
        rows.append({"task": f"iterative {mode} {tuple(case['fixed'].shape[2:])}", "device": device.type, **stats})
    return rows


def inferer_rows(out: Path, shape, device: torch.device) -> list[dict]:
    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.inferer import SegRegInferer
    from custom.io import load_nifti
    from custom.networks import segreg_unet
    from custom.synthetic.abdomen import make_abdomen

    js = out / "abdomen" / "AbdomenCTCT_dataset.json"
    if not js.exists():
        make_abdomen(str(js.parent), n_subjects=2, shape=tuple(shape))
    rec = learn2reg_pairs(js, "training_all")[0]
    vol = {
        k: torch.as_tensor(load_nifti(rec[k])[0].astype("float32"))[None, None].to(device)
        for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")
    }
    torch.manual_seed(0)
    net = segreg_unet().to(device).eval()
    inputs = torch.cat([(vol["moving_image"] + 1000) / 2000, (vol["fixed_image"] + 1000) / 2000], 1)
    rows = []
    for max_batch in (1, 4):
        inferer = SegRegInferer(margin=8, max_batch=max_batch)
        with torch.no_grad():
            stats, _ = measure(lambda: inferer(inputs, net, vol["fixed_label"], vol["moving_label"]), device)
        rows.append({"task": f"inferer max_batch={max_batch} {tuple(shape)}", "device": device.type, **stats})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_gpu")
    ap.add_argument("--thorax_shape", type=int, nargs=3, default=[80, 64, 64])
    ap.add_argument("--abdomen_shape", type=int, nargs=3, default=[192, 160, 256])
    ap.add_argument("--skip_cpu_inferer", action="store_true", help="time the full-size inferer on CUDA only")
    args = ap.parse_args()
    out = Path(args.out)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
        f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        flush=True,
    )
    case = thorax_case(out, args.thorax_shape)
    rows = []
    for dev in devices:
        rows += iterative_rows(case, dev)
        print(json.dumps(rows[-2:]), flush=True)
    for dev in devices:
        if dev.type == "cpu" and args.skip_cpu_inferer:
            continue
        rows += inferer_rows(out, args.abdomen_shape, dev)
        print(json.dumps(rows[-2:]), flush=True)
    print(f"\n{'task':<44}{'device':>7}{'wall s':>9}{'CPU s':>9}{'peak GiB':>10}{'Dice %':>8}{'TRE mm':>8}")
    for r in rows:
        extra = f"{r.get('dice_mean', float('nan')):>8.2f}{r.get('tre_mm', float('nan')):>8.2f}"
        print(f"{r['task']:<44}{r['device']:>7}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_gib']:>10.2f}{extra}")
    by = {(r["task"], r["device"]): r for r in rows}
    for task in dict.fromkeys(r["task"] for r in rows):
        if (task, "cpu") in by and (task, "cuda") in by:
            speed_up = by[(task, "cpu")]["wall_s"] / by[(task, "cuda")]["wall_s"]
            print(f"speed-up cuda vs cpu (wall), {task}: {speed_up:.1f}x")


if __name__ == "__main__":
    main()
