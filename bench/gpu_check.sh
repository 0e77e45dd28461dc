#!/usr/bin/env bash
# Every GPU check behind one command (`make gpu-check`). Uses the python3 and torch it finds (no
# venv, no downloads) and writes everything into the report folder given as $1 (gpu-report).
# Put onnxruntime-gpu first on PYTHONPATH to include ORT's CUDAExecutionProvider.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-gpu-report}
PYTHON=${PYTHON:-python3}
mkdir -p "$REPORT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
status=0
run() {  # run NAME CMD...: log to $REPORT/NAME.txt, remember failures
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$REPORT/$name.txt" 2>&1; then echo "   ok"; else echo "   FAILED (exit $?), see $REPORT/$name.txt"; status=1; fi
  tail -n 25 "$REPORT/$name.txt"
}
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PYTHON -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'
  for m in onnx onnxruntime onnxscript; do $PYTHON -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1; done
  $PYTHON -c 'import onnxruntime as o; print("ort providers", o.get_available_providers())' 2>&1 | tail -1
} > "$REPORT/environment.txt"
cat "$REPORT/environment.txt"
run pytest_cuda "$PYTHON" -m pytest -m cuda -rs -q -p no:cacheprovider tests
run export_cuda "$PYTHON" export/export.py --device cuda --force --out "$REPORT/artifacts"
PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
run cpp_build bash -c "cmake -S cpp -B '$REPORT/build' -DCMAKE_PREFIX_PATH='$PREFIX' && cmake --build '$REPORT/build' -j"
for engine in native torchscript; do
  run "cpp_train_cuda_$engine" "$REPORT/build/train_ctrnn" "$REPORT/artifacts" --engine $engine --steps 300 --device cuda \
    --out "$REPORT/ctrnn_trained_cuda_$engine.pt"
done
run bench_cuda "$PYTHON" bench/bench_loss.py --device cuda --rounds 21
echo "report in $REPORT/ (exit $status)"
exit $status
