#!/usr/bin/env bash
# Builds the full CUDA extension on a GPU-less machine against the CUDA torch
# 2.14.1 (a 5.5 GB venv in .venv-cuda), then imports it and prints its build info.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HX_CUDA_VENV:-.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q "torch==2.14.1" numpy ninja pybind11 pytest
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
rm -rf build/cuda-tmp
HX_BUILD=cuda "$VENV/bin/python" setup.py build_ext --build-temp build/cuda-tmp --build-lib build/cuda-lib
"$VENV/bin/python" - <<'PY'
import glob, importlib.util, sys
so = glob.glob("build/cuda-lib/heterospec_ext/_C*.so")[0]
import torch
spec = importlib.util.spec_from_file_location("heterospec_ext._C", so)
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
print("CUDA extension built:", so, "with_cuda =", mod.with_cuda, "archs =", mod.cuda_arch_list,
      "torch =", mod.torch_version)
ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("heterospec::")]
cuda = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print("ops with a CUDA kernel:", sorted(cuda))
assert mod.with_cuda
missing = sorted(set(ops) - set(cuda))
assert not missing, f"ops without a CUDA kernel: {missing}"
PY
