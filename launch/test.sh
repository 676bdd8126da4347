#!/usr/bin/env bash
# The test suite: set up .venv with the dev extras, then pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv dev
# The SLURM tests run a real cluster on this machine (tests/slurm_cluster.py); without the
# packages they skip. Install them where they are missing and apt may be used (root), unless
# VITDIST_NO_APT is set. The package lists are refreshed first: images often ship without them.
if ! command -v slurmctld >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
    && [ -z "${VITDIST_NO_APT:-}" ]; then
  echo "installing SLURM and munge for the SLURM tests (apt-get; VITDIST_NO_APT=1 skips them instead)"
  { apt-get update -q && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge; } \
    > /tmp/vitdist-apt.log 2>&1 \
    || echo "installing SLURM failed (/tmp/vitdist-apt.log): the SLURM tests will skip" >&2
fi
# Three tests at a time, each test file on one worker (the SLURM tests share one cluster): a test
# waits on process start-ups, timeouts and SLURM's scheduling much of its time, which the others
# fill on a 2-core machine (measured 2026-12-05: 20 min 17 s with three, 24 min 43 s with two).
# `-n 0` runs them one at a time.
exec python -m pytest -n 3 --dist loadfile --durations=15 "$@"
