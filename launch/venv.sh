# Sourced by demo.sh and test.sh: make sure .venv exists and holds the project (and its extras).
# Usage: ensure_venv [extras]   e.g. ensure_venv dev
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
  if ! .venv/bin/python -c "import $imports" 2>/dev/null; then
    echo "installing vitdist$([ -n "$extras" ] && echo "[$extras]") into .venv (torch is large: a few minutes the first time)"
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e "$spec" > .venv/install.log 2>&1; then
      tail -n 30 .venv/install.log
      echo "installing into .venv failed; the whole log is .venv/install.log" >&2
      return 1
    fi
  fi
  export PATH="$PWD/.venv/bin:$PATH"
}
