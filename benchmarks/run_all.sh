#!/usr/bin/env bash
# Regenerates every benchmark table and figure under docs/benchmarks/ on this machine (CPU only; about 1.5 hours on 2
# cores, the learned trainings and the 390x280x300 thorax pair the longest parts). Needs the peers:
# pip install -e ".[bench]".
# Usage: [OUT=DIR] bash benchmarks/run_all.sh [--quick]   (--quick skips the 390x280x300 thorax pair)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-docs/benchmarks}"  # OUT=DIR writes the pages elsewhere (e.g. to compare with the committed ones)
LARGE=""
if [ "${1:-}" = "--quick" ]; then LARGE="--skip_large"; fi
"$PY" benchmarks/physical_accuracy.py --out "$OUT"
"$PY" benchmarks/peer_accuracy.py --out "$OUT" --fresh
"$PY" benchmarks/learned_accuracy.py --out "$OUT" --fresh
"$PY" benchmarks/segmentation_quality.py --out "$OUT"
"$PY" benchmarks/number_of_regions.py --out "$OUT"
"$PY" benchmarks/inverse_consistency.py --md "$OUT/inverse_consistency.md"
"$PY" benchmarks/region_sets.py --md "$OUT/region_sets.md"
"$PY" benchmarks/solver_scaling.py --md "$OUT/solver_scaling.md"
"$PY" benchmarks/thorax_accuracy.py --md "$OUT/thorax_accuracy.md"
"$PY" benchmarks/cohort_throughput.py --md "$OUT/cohort_throughput.md"
"$PY" benchmarks/inference_cost.py --md "$OUT/inference_cost.md"
"$PY" benchmarks/iterative_speed.py --md "$OUT/iterative_speed.md" $LARGE
echo "tables and figures regenerated under $OUT"
