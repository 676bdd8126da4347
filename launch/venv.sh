# Sourced by demo.sh and test.sh: make sure .venv exists and holds this checkout's project (and its
# extras) at the versions pyproject.toml asks for.
# Usage: ensure_venv [extras]   e.g. ensure_venv dev
_venv_ready() {
  # -I: not from the working directory, where ./vitdist imports even when .venv does not hold it.
  .venv/bin/python -I -c "import $1, os, sys
here = os.path.realpath('vitdist')
if os.path.dirname(os.path.realpath(vitdist.__file__)) != here:
    sys.exit(f'.venv holds vitdist from {os.path.dirname(vitdist.__file__)}, not {here}')" 2>&1 | tail -n 1
  return "${PIPESTATUS[0]}"
}

ensure_venv() {
  local extras=${1:-}
  local spec="." imports="vitdist, torch, torchvision, timm, webdataset, tensorboard, yaml, tqdm"
  if [ -n "$extras" ]; then spec=".[$extras]"; fi
  if [ "$extras" = demo ]; then imports="$imports, sklearn"; fi
  if [ "$extras" = dev ]; then imports="$imports, sklearn, pytest, xdist"; fi
  if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    python3 -m venv .venv
  fi
  # pyproject.toml as last installed with these extras: a pull that raises a bound reinstalls, where
  # imports alone would pass.
  local stamp=.venv/vitdist-pyproject${extras:+-$extras} wanted
  wanted=$(cksum < pyproject.toml)
  if ! _venv_ready "$imports" > /dev/null || [ "$(cat "$stamp" 2> /dev/null)" != "$wanted" ]; then
    echo "installing vitdist$([ -n "$extras" ] && echo "[$extras]") into .venv (torch is large: a few minutes the first time)"
    local broken
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e "$spec" > .venv/install.log 2>&1; then
      tail -n 30 .venv/install.log
      echo "installing into .venv failed; the whole log is .venv/install.log (a .venv without pip: rm -rf .venv," \
        "and run this again)" >&2
      return 1
    fi
    if ! broken=$(_venv_ready "$imports"); then  # pip found it all installed, but a part is damaged
      echo "after installing, .venv still fails: $broken; it is damaged (an install cut short?): rm -rf .venv, and" \
        "run this again" >&2
      return 1
    fi
    echo "$wanted" > "$stamp"
  fi
  export PATH="$PWD/.venv/bin:$PATH"
}
