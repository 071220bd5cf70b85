#!/usr/bin/env bash
# Set up, then run the main job: calibrate and compare on the bundled trained testbed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ditfastattn demo "$@"
