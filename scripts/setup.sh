#!/usr/bin/env bash
# Create .venv (if missing) and install chronomerge with its test extras. Idempotent and offline
# apart from the package registries. On x86_64 Linux it installs the torch 2.14.1 /
# torchvision 0.29.1 pair (the CPU torch 2.13 wheel breaks torchvision's operators).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
LOG=.venv/install.log
pins=()
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then pins=(torch==2.14.1 torchvision==0.29.1); fi
# Reinstall whenever pyproject.toml changes (its hash is stamped into the venv).
stamp=$(sha256sum pyproject.toml | cut -d" " -f1)
if [ "$(cat .venv/.chronomerge-installed 2>/dev/null)" != "$stamp" ]; then
  echo "installing into .venv (log: $LOG) ..."
  # uv installs the same packages as pip, several times faster (parallel downloads and unpacking);
  # pip (which also reads this machine's pip configuration) is the fallback. Both compile the
  # bytecode at install (uv only when asked): where PYTHONDONTWRITEBYTECODE is set, Python never
  # writes .pyc files, and every `chronomerge` command would compile torch, open_clip, Prefect and
  # MLflow from source again (about 10 s per process on 2 cores).
  { .venv/bin/pip install --disable-pip-version-check -q uv \
      && .venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode "${pins[@]}" -e ".[dev]"; } \
      >"$LOG" 2>&1 \
    || .venv/bin/pip install --disable-pip-version-check -q "${pins[@]}" -e ".[dev]" >>"$LOG" 2>&1 \
    || { grep -v "^WARNING: Location" "$LOG" | tail -30; exit 1; }
  echo "$stamp" > .venv/.chronomerge-installed
fi
