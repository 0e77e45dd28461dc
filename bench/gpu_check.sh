#!/usr/bin/env bash
# Every GPU check behind one command (`make gpu-check`). Uses the python3 and torch it finds (no
# venv, no downloads) and writes everything into the report folder given as $1 (gpu-report):
# one log per step and summary.txt (each step: ok or FAILED, with its seconds).
#
# Two lanes run side by side, then the benchmark alone on a quiet GPU:
#   C++:    build cpp/ (CPU), then train_ctrnn --device cuda with both engines;
#   Python: the CUDA tests, then export --device cuda with its parity table.
# ONNX Runtime's CUDAExecutionProvider: put onnxruntime-gpu first on PYTHONPATH. If it is still
# being copied in when this starts, set RNNLOSS_GPU_WAIT_FOR=FILE: the Python lane waits (up to
# RNNLOSS_GPU_WAIT_SECONDS, 300) for FILE to exist, while the C++ lane builds; with it set, a FILE
# that never comes or a provider that does not load is a FAILED step (without it, the placement
# check is skipped). Where
# the provider does not load with the loader path as it is, the lib folders of the nvidia-* wheels
# are added to LD_LIBRARY_PATH (the report says whether that was needed). No visible GPU is a FAILED
# step too (the rest still runs, for a dry run of the script). Each step is killed after
# RNNLOSS_GPU_STEP_TIMEOUT seconds (600) and reported FAILED (exit 124).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-gpu-report}
PYTHON=${PYTHON:-python3}
mkdir -p "$REPORT"
REPORT=$(cd "$REPORT" && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
# Nothing of an earlier run in this folder may pass for this run's: its logs, status files, trained
# models, C++ program, CMake cache (torch and CUDA paths) and CUDA link folder. The build folder's
# objects are kept for an incremental build.
for step in environment cpp_build cpp_build_with_wheel_cuda pytest_cuda export_cuda ort_cuda_placement \
    cpp_train_cuda_native cpp_train_cuda_torchscript bench_cuda; do rm -f "$REPORT/$step.txt"; done
rm -f "$REPORT/.export-status" "$REPORT/.cpp-build-ok" "$REPORT/.cpp-build-retried-ok" "$REPORT/build/train_ctrnn" \
  "$REPORT/build/CMakeCache.txt" "$REPORT"/ctrnn_trained_cuda_*.pt
rm -rf "$REPORT/cuda-from-wheels"
STEP_TIMEOUT=${RNNLOSS_GPU_STEP_TIMEOUT:-600}  # seconds; a step that hangs is killed and FAILED (exit 124)
: > "$REPORT/summary.txt"

failed() {  # failed NAME WHY: a FAILED line for a check that could not run as asked
  echo "FAILED  $1 ($2)" | tee -a "$REPORT/summary.txt"
}

run() {  # run NAME CMD...: log to $REPORT/NAME.txt, one line to summary.txt
  local name=$1 start=$SECONDS rc=0; shift
  echo "== $name: $*"
  # timeout puts the step in a process group of its own, which Ctrl-C does not reach: stop it here.
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@" > "$REPORT/$name.txt" 2>&1 &
  local step=$!
  trap "kill -TERM $step 2>/dev/null; echo 'gpu_check: interrupted during $name' >&2; exit 130" INT TERM
  wait $step || rc=$?
  trap - INT TERM
  local line
  if [ $rc -eq 0 ]; then line="ok      $name ($((SECONDS - start)) s)"
  else line="FAILED  $name (exit $rc, $((SECONDS - start)) s): see $name.txt"; fi
  echo "$line" | tee -a "$REPORT/summary.txt"
  return $rc
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -n 2
  $PYTHON -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'
} > "$REPORT/environment.txt" 2>&1
cat "$REPORT/environment.txt"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  failed gpu_visible "torch sees no CUDA GPU: every CUDA test would be skipped; the other steps run anyway"
fi

cpp_lane() {
  local prefix
  prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  if run cpp_build bash -c "cmake -S cpp -B '$REPORT/build' -DCMAKE_PREFIX_PATH='$prefix' && cmake --build '$REPORT/build' -j"; then
    touch "$REPORT/.cpp-build-ok"
  elif command -v nvcc > /dev/null; then
    # torch's CMake wants a CUDA toolkit with cudart's headers and libraries; where the system has
    # only nvcc, point it at the nvidia-* wheels' copies through a folder of links.
    local shim="$REPORT/cuda-from-wheels" cu
    cu=$("$PYTHON" -c 'import glob, nvidia; print(next(iter(sorted(p for d in nvidia.__path__ for p in glob.glob(d + "/cu*") if glob.glob(p + "/include/cuda_runtime.h")))))')
    rm -rf "$shim" "$REPORT/build" && mkdir -p "$shim/bin" "$shim/lib64" && ln -s "$(dirname "$(command -v nvcc)")"/* "$shim/bin/" && ln -s "$cu/include" "$shim/include"
    for f in "$cu"/lib/*.so.*; do b=$(basename "$f"); ln -sf "$f" "$shim/lib64/$b"; ln -sf "$f" "$shim/lib64/${b%%.so.*}.so"; done
    if run cpp_build_with_wheel_cuda bash -c "cmake -S cpp -B '$REPORT/build' -DCMAKE_PREFIX_PATH='$prefix' -DCUDA_TOOLKIT_ROOT_DIR='$shim' -DCUDAToolkit_ROOT='$shim' && cmake --build '$REPORT/build' -j"; then
      touch "$REPORT/.cpp-build-ok" "$REPORT/.cpp-build-retried-ok"  # the first FAILED line is amended at the end
    fi
  fi
  while [ ! -e "$REPORT/.export-status" ]; do sleep 2; done
  if [ ! -e "$REPORT/.cpp-build-ok" ]; then
    echo "skipped cpp_train_cuda_*: the C++ build failed (above)" | tee -a "$REPORT/summary.txt"
    return
  fi
  if [ "$(cat "$REPORT/.export-status")" != 0 ]; then
    echo "skipped cpp_train_cuda_*: the export failed, no artifacts to train from" | tee -a "$REPORT/summary.txt"
    return
  fi
  for engine in native torchscript; do
    run "cpp_train_cuda_$engine" "$REPORT/build/train_ctrnn" "$REPORT/artifacts" --engine $engine --steps 300 \
      --device cuda --out "$REPORT/ctrnn_trained_cuda_$engine.pt"
  done
}

# Probe: can ONNX Runtime open a session on CUDAExecutionProvider (torch imported first, as in the
# export)? Prints the providers the session got.
ort_probe() {
  "$PYTHON" - <<'EOF'
import torch  # noqa: F401  (loads the CUDA libraries the way the export does)
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
print("onnxruntime", ort.__version__, "from", ort.__file__, "providers", ort.get_available_providers())
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
print("session providers", session.get_providers())
raise SystemExit(0 if "CUDAExecutionProvider" in session.get_providers() else 1)
EOF
}

python_lane() {
  if [ -n "${RNNLOSS_GPU_WAIT_FOR:-}" ]; then
    local waited=0
    while [ ! -e "$RNNLOSS_GPU_WAIT_FOR" ] && [ $waited -lt "${RNNLOSS_GPU_WAIT_SECONDS:-300}" ]; do
      sleep 2; waited=$((waited + 2))
    done
    echo "waited ${waited} s for $RNNLOSS_GPU_WAIT_FOR" >> "$REPORT/environment.txt"
    [ -e "$RNNLOSS_GPU_WAIT_FOR" ] || failed wait_for "RNNLOSS_GPU_WAIT_FOR=$RNNLOSS_GPU_WAIT_FOR did not appear in $waited s"
  fi
  {
    for m in onnx onnxruntime onnxscript triton; do $PYTHON -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1; done
    if ort_probe; then echo "CUDAExecutionProvider loads as installed"
    else
      local before=${LD_LIBRARY_PATH:-} libs
      libs=$("$PYTHON" -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/*.so*")})))' 2>/dev/null)
      export LD_LIBRARY_PATH="${libs}${before:+:$before}"
      echo "CUDAExecutionProvider did not load as installed; retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      if ort_probe; then echo "CUDAExecutionProvider loads with the nvidia-* lib folders on LD_LIBRARY_PATH"
      else echo "CUDAExecutionProvider does not load either way"; export LD_LIBRARY_PATH="$before"; fi
    fi
  } >> "$REPORT/environment.txt" 2>&1  # a { } group: the export above stays in this shell
  run pytest_cuda "$PYTHON" -m pytest -m cuda -rs -q -p no:cacheprovider tests
  # The GPU image has no executorch (and torch 2.11): export without the ExecuTorch programs there.
  local config_args=()
  if ! "$PYTHON" -c "import executorch" 2>/dev/null; then
    echo '{"executorch": null}' > "$REPORT/no-executorch.json"
    config_args=(--config "$REPORT/no-executorch.json")
  fi
  run export_cuda "$PYTHON" export/export.py --device cuda --force --out "$REPORT/artifacts" "${config_args[@]}"
  local export_status=$?
  echo $export_status > "$REPORT/.export-status.tmp" && mv "$REPORT/.export-status.tmp" "$REPORT/.export-status"
  if ! grep -q "^CUDAExecutionProvider loads" "$REPORT/environment.txt"; then
    if [ -n "${RNNLOSS_GPU_WAIT_FOR:-}" ]; then  # onnxruntime-gpu was staged for this run
      failed ort_cuda_provider "onnxruntime-gpu was staged (RNNLOSS_GPU_WAIT_FOR) but CUDAExecutionProvider does not load: see environment.txt"
    else
      echo "skipped ort_cuda_placement: onnxruntime has no CUDAExecutionProvider here" | tee -a "$REPORT/summary.txt"
    fi
  elif [ $export_status != 0 ]; then
    echo "skipped ort_cuda_placement: the export failed, no artifacts to place" | tee -a "$REPORT/summary.txt"
  else
    run ort_cuda_placement "$PYTHON" bench/ort_placement.py "$REPORT/artifacts"
  fi
}

cpp_lane &
cpp_pid=$!
# Never leave the C++ lane (or the step it runs) behind, e.g. waiting for an export that will not come.
# The lane first: its own TERM trap stops its step without writing a result line for it.
trap 'kill $cpp_pid 2>/dev/null; pkill -P $cpp_pid 2>/dev/null' EXIT
python_lane
wait $cpp_pid
run bench_cuda "$PYTHON" bench/bench_loss.py --device cuda --rounds 21 --cpp "$REPORT/build/train_ctrnn"
if [ -e "$REPORT/.cpp-build-ok" ] && grep -q "C++ .*not measured" "$REPORT/bench_cuda.txt" 2>/dev/null; then
  failed bench_cuda_cpp "the C++ training step was built but not measured: see bench_cuda.txt"
fi

if [ -e "$REPORT/.cpp-build-retried-ok" ]; then
  sed -i 's/^FAILED  cpp_build (/retried cpp_build (/' "$REPORT/summary.txt"
fi
for log in "$REPORT"/*.txt; do
  name=$(basename "$log" .txt)
  if grep -q "^FAILED  $name " "$REPORT/summary.txt"; then echo "--- $name (last 40 lines)"; tail -n 40 "$log"; fi
done
echo "--- summary ($REPORT/summary.txt)"
cat "$REPORT/summary.txt"
! grep -q '^FAILED' "$REPORT/summary.txt"
