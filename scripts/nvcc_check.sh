#!/usr/bin/env bash
# Compiles every torch-free .cu file for sm_80 and sm_90 with warnings shown
# (about a second each). Needs only the CUDA toolkit, no GPU and no CUDA torch.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no .cu files"; exit 0; fi
if [ ! -x "$NVCC" ]; then echo "nvcc not found at $NVCC"; exit 1; fi
status=0
obj=$(mktemp --suffix=.o)
trap 'rm -f "$obj"' EXIT
for f in "${files[@]}"; do
  start=$(date +%s%N)
  if "$NVCC" -std=c++20 -O3 -Icsrc --expt-relaxed-constexpr -Xcompiler -Wall,-Wextra \
      -Werror all-warnings \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -c "$f" -o "$obj"; then
    printf 'nvcc ok   %-48s %d ms\n' "$f" $(( ($(date +%s%N) - start) / 1000000 ))
  else
    echo "nvcc FAIL $f"; status=1
  fi
done
exit $status
