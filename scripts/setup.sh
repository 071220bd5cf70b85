#!/usr/bin/env bash
# Create .venv (once) and install the pinned CPU requirements and ditfastattn itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
