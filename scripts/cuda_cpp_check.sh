#!/usr/bin/env bash
# Syntax-checks csrc/cuda/*_cuda.cpp (the torch-side CUDA bindings) against the
# CUDA torch headers, without building the extension. Usage:
#   scripts/cuda_cpp_check.sh [FILE...]      (default: every csrc/cuda/*_cuda.cpp)
# Needs a CUDA torch: HX_CUDA_VENV (default .venv-cuda, see scripts/build_cuda.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${HX_CUDA_VENV:-.venv-cuda}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no CUDA torch venv at $VENV (run scripts/build_cuda.sh)"; exit 1; }
TORCH_INC=$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()))')
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
shopt -s nullglob
files=("$@"); [ ${#files[@]} -eq 0 ] && files=(csrc/cuda/*_cuda.cpp)
status=0
for f in "${files[@]}"; do
  if g++ -std=c++20 -fsyntax-only -Wall -Wextra -DHX_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
      -Icsrc $TORCH_INC -I"${CUDA_HOME:-/usr/local/cuda}/include" -I"$PY_INC" "$f"; then
    echo "g++ ok   $f"
  else
    echo "g++ FAIL $f"; status=1
  fi
done
exit $status
