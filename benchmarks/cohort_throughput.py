"""Cohort throughput of the training-free ``segreg_thorax`` bundle: pairs per minute with 1 and 2 torchrun ranks on
this machine (gloo on CPU; nccl and one GPU per rank on a GPU machine).

Usage: ``python benchmarks/cohort_throughput.py [--pairs 8] [--ranks 1,2] [--data /tmp/segreg_cohort]
[--md docs/benchmarks/cohort_throughput.md]``.

Each setting is one ``torchrun --standalone --nproc_per_node=N -m monai.bundle run`` of the bundle's
``inference.json`` + ``multi_gpu_evaluate.json`` over the same synthetic thorax pairs (80 x 64 x 64, the bundle's
settings), in a fresh process tree; the wall seconds of the whole command (start-up included) and the CPU seconds
of all its processes (``RUSAGE_CHILDREN``) are measured, and the last line is ``ratio_2_vs_1_ranks=<x>`` (pairs per
minute). torchrun gives each of several ranks one CPU thread (``OMP_NUM_THREADS=1``); one rank keeps torch's default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_ranks(n: int, data: Path, out: Path, backend: str) -> dict:
    cfg = REPO / "bundles" / "segreg_thorax" / "configs"
    files = "[" + ",".join(f"'{cfg / f}'" for f in ("inference.json", "evaluate.json", "multi_gpu_evaluate.json")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "monai.bundle", "run", "--config_file", files, "--dist_backend", backend, "--dataset_dir", str(data),
           "--output_dir", str(out), "--num_workers", "0", "--progress", "false", "--overwrite", "true"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{n} ranks failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    cases = json.loads((out / "metrics.json").read_text())["cases"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tre = sum(c["tre_mm"] for c in cases) / len(cases)
    return {"ranks": n, "pairs": len(cases), "wall_s": wall, "cpu_s": cpu, "pairs_per_min": 60 * len(cases) / wall,
            "tre_mm": tre}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8, help="validation pairs (2 per synthetic subject)")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--data", default="/tmp/segreg_cohort")
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks" / "cohort_throughput.md"))
    args = ap.parse_args()
    from custom.io import save_text
    from custom.synthetic.thorax import make_thorax

    subjects = max(1, args.pairs // 2)
    data = Path(args.data) / "thorax"
    if not (data / "ThoraxCBCT_dataset.json").is_file():
        make_thorax(str(data), n_subjects=subjects, n_val=subjects, seed=5)
    rows = []
    for n in (int(r) for r in args.ranks.split(",")):
        rows.append(run_ranks(n, data, Path(args.data) / f"eval_{n}", args.backend))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    lines = [
        "# Cohort throughput: the thorax bundle under torchrun\n",
        f"Regenerate: `python benchmarks/cohort_throughput.py --pairs {args.pairs}`. {rows[0]['pairs']} synthetic "
        f"thorax pairs (80 x 64 x 64 at 3 mm, the bundle's settings), backend {args.backend}, "
        "`inference.json` + `evaluate.json` + `multi_gpu_evaluate.json`; wall s = the whole torchrun command, start-up "
        "included; CPU s = all its processes. Several ranks get one CPU thread each (torchrun's default).\n",
        "| ranks | pairs | wall s | CPU s | pairs / min | mean TRE mm |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ranks']} | {r['pairs']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['pairs_per_min']:.2f} "
        f"| {r['tre_mm']:.3f} |"
        for r in rows
    ]
    save_text("\n".join(lines) + "\n", args.md)
    print("\n".join(lines))
    by = {r["ranks"]: r for r in rows}
    if 1 in by and 2 in by:
        print(f"ratio_2_vs_1_ranks={by[2]['pairs_per_min'] / by[1]['pairs_per_min']:.3f}")


if __name__ == "__main__":
    main()
