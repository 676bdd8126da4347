#!/usr/bin/env bash
# The packages vitdist needs that the lent GPU machine lacks (it reaches no registry), as wheels in
# .whl/ for the device tool to carry; bench/device_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl webdataset braceexpand
ls .whl
