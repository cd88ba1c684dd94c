#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
.venv/bin/ruff check --quiet .  # the style gate (pyproject.toml [tool.ruff])
# Two workers (pytest-xdist): much of the suite waits on subprocesses, servers and disk. Work stealing
# rebalances them: the slow tests, collected first (tests/conftest.py), would otherwise all land on one.
exec .venv/bin/python -m pytest -q -n 2 --dist worksteal "$@"
