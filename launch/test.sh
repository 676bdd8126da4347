#!/usr/bin/env bash
# The test suite: set up .venv with the dev extras, then pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv dev
# The SLURM tests run a real cluster on this machine (tests/slurm_cluster.py); without the
# packages they skip. Install them in CI, or where they are missing and apt may be used (root).
if ! command -v slurmctld >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  if [ -n "${CI:-}" ] || [ -z "${VITDIST_NO_APT:-}" ]; then
    echo "installing SLURM and munge for the SLURM tests (apt-get; VITDIST_NO_APT=1 skips them instead)"
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge > /tmp/vitdist-apt.log 2>&1 \
      || echo "installing SLURM failed (/tmp/vitdist-apt.log): the SLURM tests will skip" >&2
  fi
fi
exec python -m pytest --durations=15 "$@"
