#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run (CPU, no GPU needed):
#   1. the C++ core tests (CMakeLists.txt, GoogleTest) built with -fsanitize=address,undefined,
#      run by ctest;
#   2. a second copy of the extension built with the same flags into build/sanitize/stage
#      (the editable install in .venv is left alone), then, with python started under
#      LD_PRELOAD=libasan (python itself is not instrumented) and that copy first on the path:
#      the bad-input tests, the meta / mixed-device tests, the decode-layer ops' tests, the
#      concurrency test and a slice of the fuzz suite.
# Any report aborts the process that hit it (-fno-sanitize-recover=all, halt_on_error), so a
# report fails the step. Leak detection is off: CPython and torch keep allocations to exit.
# Usage: bash scripts/sanitize.sh   (HX_SANITIZE_FUZZ_EXAMPLES: fuzz examples per op, 60)
# Expects .venv and libgtest-dev, both from scripts/setup_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${HX_VENV:-.venv}
PY="$PWD/$VENV/bin/python"
OUT="$PWD/build/sanitize"
SANITIZERS=address,undefined
FLAGS="-fsanitize=$SANITIZERS -fno-sanitize-recover=all -fno-omit-frame-pointer"
FUZZ_EXAMPLES=${HX_SANITIZE_FUZZ_EXAMPLES:-60}
status=0
started=$(date +%s)
step() { echo "== sanitize: $1 ($(( $(date +%s) - started )) s) =="; }

step "C++ core tests with $SANITIZERS"
rm -rf "$OUT/cmake"
if cmake -S . -B "$OUT/cmake" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="$FLAGS -O1" \
    >/dev/null && cmake --build "$OUT/cmake" -j 2 >/dev/null; then
  (cd "$OUT/cmake" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure | tail -3) || status=1
  [ -x "$OUT/cmake/heterospec_core_tests" ] || { echo "core tests not built (no GoogleTest?)"; status=1; }
else
  echo "cmake build failed"; status=1
fi

step "extension with $SANITIZERS into $OUT/stage"
rm -rf "$OUT/stage"
mkdir -p "$OUT/stage"
cp -r heterospec_ext "$OUT/stage/"
rm -f "$OUT/stage/heterospec_ext/"_C*.so
find "$OUT/stage" -name __pycache__ -prune -exec rm -rf {} +
if ! HX_BUILD=cpu HX_SANITIZE=$SANITIZERS MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext \
    --build-lib "$OUT/stage" --build-temp "$OUT/obj" > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "sanitizer build failed"; exit 1
fi

# libasan first (python is not instrumented); libstdc++ too, or ASan's __cxa_throw interceptor
# finds no real __cxa_throw (python does not link libstdc++) and aborts on the first C++ throw.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# -P / PYTHONSAFEPATH: no implicit current directory on sys.path, so `import heterospec_ext`
# finds the sanitized copy first, also in any subprocess a test starts.
export PYTHONPATH="$OUT/stage" PYTHONSAFEPATH=1
"$PY" -c "import heterospec_ext as hx; assert hx.__file__.startswith('$OUT/stage'), hx.__file__" \
  || { echo "the sanitized copy is not the one imported"; exit 1; }
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p no:benchmark --durations=5)

step "bad-input tests under $SANITIZERS"
"${PYTEST[@]}" tests/test_draft_topk_entropy.py tests/test_stratify.py tests/test_build_tree.py \
  tests/test_fused_verify.py tests/test_meta_devices.py \
  -k "bad or error or invalid or malformed or lowest or printed or meta" || status=1

step "decode-layer ops under $SANITIZERS"
"${PYTEST[@]}" tests/test_decode_layer.py || status=1

step "concurrency and fuzz slice ($FUZZ_EXAMPLES examples per op) under $SANITIZERS"
HX_FUZZ_EXAMPLES=$FUZZ_EXAMPLES HX_FUZZ_DERANDOMIZE=1 "${PYTEST[@]}" tests/test_concurrency.py \
  tests/test_fuzz.py -k "not planted" || status=1

step "done, status $status"
exit $status
