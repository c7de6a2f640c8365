#!/usr/bin/env bash
# Main job: set up the environment, then run the four ops on real-sized inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
exec "${HX_VENV:-.venv}/bin/python" -m heterospec_ext.demo "$@"
