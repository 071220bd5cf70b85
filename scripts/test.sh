#!/usr/bin/env bash
# Set up, then run the CPU test suite (the Triton kernel runs under its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
