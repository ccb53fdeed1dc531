#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then lints, type-checks and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/ruff check splitflower strategies algorithms tests benchmarks examples scripts
.venv/bin/mypy  # the paths are pyproject.toml's [tool.mypy] files
.venv/bin/python -m pytest -q "$@"
