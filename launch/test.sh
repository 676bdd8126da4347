#!/usr/bin/env bash
# The test suite: set up .venv with the dev extras, then pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv dev
exec python -m pytest --durations=15 "$@"
