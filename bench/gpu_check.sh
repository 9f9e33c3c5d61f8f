#!/usr/bin/env bash
# Issue 6: the GPU check, as one prepared script (well under 8 minutes on an H100).
#   bash bench/gpu_check.sh            # on a machine with an NVIDIA GPU
# 1. onnxruntime with CUDA: the machine's own if it offers CUDAExecutionProvider, else the
#    onnxruntime-gpu wheel carried in parts (.gpu/p*/ort.whl.part-*, named by .gpu/base/ort.whl.name:
#    a call to the device tool carries at most 64 MiB) is joined and installed into ~/.gap-gpu-site with
#    the other wheels in .gpu/base (no network needed).
# 2. The engine and device tests, with CUDA as the default provider.
# 3. bench/gpu.py: CUDA vs CPU trees, float16 error, the benchmark table, GPU memory over time.
# 4. bench/throughput.py on a ResNet-50 repository (issue 14): explanations/s at concurrency 1, 4,
#    16, 64 with dynamic batching on and off, GPU utilisation from nvidia-smi; goal: >= 4x at 16 vs 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
has_cuda() { "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; }

if ! has_cuda; then
  mkdir -p .gpu/wheels
  cat .gpu/p*/ort.whl.part-* > ".gpu/wheels/$(cat .gpu/base/ort.whl.name)"
  site="${GPU_SITE:-$HOME/.gap-gpu-site}"  # outside the checkout, which the device tool re-syncs
  "$PY" -m pip install --quiet --upgrade --no-deps --no-index --target "$site" .gpu/wheels/*.whl .gpu/base/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import onnxruntime as ort
from gap_service.runtime import resolve_providers, RuntimeConfig
print("onnxruntime", ort.__version__, ort.__file__)
print("available providers:", ort.get_available_providers())
print("resolved:", resolve_providers(RuntimeConfig()))
PYEOF
has_cuda || { echo "no CUDAExecutionProvider: nothing to check on this machine"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"

echo "== engine and device tests with CUDA as the default provider"
status=0
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --tb=short tests/test_engine.py tests/test_device.py tests/test_rules.py \
  > "$OUT/tests.txt" 2>&1 || status=$?
tail -25 "$OUT/tests.txt"

echo "== CUDA vs CPU trees and the benchmark table"
timeout 420 "$PY" bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt"

echo "== throughput: depth-3 ResNet-50 trees against concurrency, dynamic batching on and off"
"$PY" bench/model_repository.py --arch resnet50 --out "$OUT/repository"
timeout 300 "$PY" bench/throughput.py --repository "$OUT/repository" --model resnet50 --provider cuda \
  --concurrency 1 4 16 64 --seconds 8 --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || status=$?
exit "$status"
