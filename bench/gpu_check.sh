#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool on an H100/H200):
#   1. builds the CUDA extension in place (sm_90 only, to keep it short),
#   2. runs the test suite (every test on cpu and cuda) and the CUDA-graph test,
#   3. runs compute-sanitizer memcheck over a short script calling every op on CUDA, then
#      memcheck and racecheck over a slice of the fuzz suite on CUDA (tests/test_fuzz.py),
#   4. measures the copy bandwidth and benchmarks every op against its composition,
#   5. times one driver draft+verify cycle per tree size, eager vs CUDA-graph replay
#      (bench/tools/bench_cycle_graphs.py, a random model with the Llama-3.1-8B config, ~1 min).
# Prints the benchmark table last and writes everything under $OUT (or ./out).
# Usage: bash bench/gpu_check.sh [--all]   (--all: also the CPU-parametrised tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
# The kernels build in place and the driver is imported from the tree (nothing is installed).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
step() { echo; echo "=== $1 ($(date +%T)) ===" | tee -a "$LOG"; }
status=0

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

step "build (HX_BUILD=cuda, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
if ! HX_BUILD=cuda HX_PTXAS_VERBOSE=1 timeout 170 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED" | tee -a "$LOG"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s" | tee -a "$LOG"
grep -E "Compiling entry|registers|spill" "$OUT/build.log" > "$OUT/ptxas.log" || true
$PY -c "import heterospec_ext as hx; print(hx.build_info())" 2>&1 | tee -a "$LOG"

# The bad-input tests call the ops in-process: under xdist a test that crashes its worker fails
# alone ("worker crashed"), and the other tests still run.
step "pytest (the cuda-parametrised tests and the CUDA-graph test; CPU runs in CI)"
SEL=(-k "cuda")
[ "${1:-}" = "--all" ] && SEL=()
timeout 170 $PY -m pytest -p no:cacheprovider -n 12 tests "${SEL[@]}" --ignore-glob="tests/test_driver*" \
  -q -rfE --tb=short --timeout=90 --durations=15 -p no:benchmark > "$OUT/pytest.log" 2>&1
rc=$?
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3 | tee -a "$LOG"
if [ $rc -ne 0 ]; then
  echo "PYTEST rc=$rc" | tee -a "$LOG"; status=1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | cut -c1-300 | head -60
  grep -E "Fatal Python error|crashed while running" "$OUT/pytest.log" | head -30
fi

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  timeout 50 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY bench/tools/sanitizer_smoke.py > "$OUT/sanitizer.log" 2>&1
  rc=$?
  tail -15 "$OUT/sanitizer.log" | tee -a "$LOG"
  if [ $rc -eq 9 ]; then echo "SANITIZER found errors" | tee -a "$LOG"; status=1;
  elif [ $rc -ne 0 ]; then echo "sanitizer did not run cleanly (rc=$rc): see sanitizer.log" | tee -a "$LOG"; fi
else
  echo "compute-sanitizer not found" | tee -a "$LOG"
fi

step "compute-sanitizer memcheck + racecheck over the fuzz slice (${HX_GPU_FUZZ_EXAMPLES:-12} examples per op)"
# The fuzz suite's CUDA cases also compare every result with the float64 reference, so a
# failing test (rc 1) is a wrong result, while rc 9 is a sanitizer report. Appended to
# sanitizer.log: the device tool returns at most 8 files.
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    echo "=== fuzz slice under $tool ===" >> "$OUT/sanitizer.log"
    HX_FUZZ_EXAMPLES=${HX_GPU_FUZZ_EXAMPLES:-12} HX_FUZZ_DERANDOMIZE=1 timeout 150 \
      compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
      $PY -m pytest -p no:cacheprovider -p no:benchmark -q tests/test_fuzz.py -k cuda \
      > "$OUT/fuzz_sanitizer.tmp" 2>&1
    rc=$?
    cat "$OUT/fuzz_sanitizer.tmp" >> "$OUT/sanitizer.log"
    echo "$tool: rc=$rc; $(grep -E "passed|failed" "$OUT/fuzz_sanitizer.tmp" | tail -1)" | tee -a "$LOG"
    grep -E "ERROR SUMMARY|^E  " "$OUT/fuzz_sanitizer.tmp" | head -8 | tee -a "$LOG"
    rm -f "$OUT/fuzz_sanitizer.tmp"
    if [ $rc -ne 0 ]; then status=1; fi
  done
else
  echo "compute-sanitizer not found" | tee -a "$LOG"
fi

step "benchmarks"
timeout 100 $PY bench/tools/gpu_bench.py --replays 7 --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v '^{' || status=1

step "driver CUDA graphs: draft+verify cycle by tree size (random Llama-3.1-8B config, bf16)"
# Appended to gpu_bench.log (rows and the full results as JSON lines, then the table): $OUT
# already holds the 8 files the device tool returns.
timeout 150 $PY bench/tools/bench_cycle_graphs.py --out - 2>&1 | tee -a "$OUT/gpu_bench.log" | grep -v '^{' || status=1
echo "gpu_check status=$status" | tee -a "$LOG"
exit $status
