#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
# One torch (OpenMP) thread per process: two test workers with their subprocesses already fill the
# cores, and oversubscribed OpenMP threads spin. Every comparison in the suite is between runs made
# with this same setting (CPU results are bit-identical at one thread count).
export OMP_NUM_THREADS=1
.venv/bin/ruff check --quiet .  # the style gate (pyproject.toml [tool.ruff])
# Two workers (pytest-xdist): much of the suite waits on subprocesses, servers and disk. The slow tests
# are collected first (tests/conftest.py) and handed out two at a time (--maxschedchunk 2), so they
# spread over both workers instead of arriving as one worker's first batch.
exec .venv/bin/python -m pytest -q -n 2 --maxschedchunk 2 "$@"
