#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests, the iterative-speed benchmark on CUDA (SegReg vs ConvexAdam,
# benchmarks/iterative_speed.py), CPU vs CUDA timings side by side (benchmarks/gpu_timings.py), then the learned
# inference settings on CUDA (benchmarks/inference_cost.py: does batching regions pay on a GPU?).
# Needs torch with CUDA plus the project's pure-Python dependencies; wheels carried in .whl/ are installed first
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl monai==1.6.1 nibabel==5.4.2
#  pytorch-ignite==0.5.5 convexadam==0.2.0 simpleitk==2.5.7).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (about 8 minutes on one H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
echo "== CUDA tests =="
CUDA_TESTS=$(grep -l requires_cuda tests/test_*.py)
"$PY" -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== iterative speed on CUDA (SegReg vs ConvexAdam) =="
"$PY" benchmarks/iterative_speed.py --device cuda --methods segreg global convexadam --out /tmp/segreg_speed ${SPEED_ARGS:-} 2>&1 | tee "$OUT/iterative_speed.log"
speed_rc=${PIPESTATUS[0]}
echo "== timings =="
"$PY" benchmarks/gpu_timings.py --out /tmp/segreg_bench ${GPU_TIMINGS_ARGS:---skip_cpu_inferer} 2>&1 | tee "$OUT/gpu_timings.log"
timing_rc=${PIPESTATUS[0]}
echo "== learned inference cost on CUDA (region passes vs one whole-image pass) =="
"$PY" benchmarks/inference_cost.py --device cuda --work /tmp/segreg_inference 2>&1 | tee "$OUT/inference_cost.log"
inference_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, iterative speed exit $speed_rc, timings exit $timing_rc, inference cost exit $inference_rc"
exit $(( tests_rc || speed_rc || timing_rc || inference_rc ))
