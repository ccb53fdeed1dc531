#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then lints, type-checks and runs the test suite.
# mypy (about 40 s, one core) runs beside the tests, which leave a core idle for much of their
# time; its report follows theirs, and either failing fails the command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/ruff check splitflower strategies algorithms tests benchmarks examples scripts
mypy_report=$(mktemp)
trap 'rm -f "$mypy_report"' EXIT
.venv/bin/mypy >"$mypy_report" 2>&1 &  # the paths are pyproject.toml's [tool.mypy] files
mypy_pid=$!
tests=0
.venv/bin/python -m pytest -q "$@" || tests=$?
types=0
wait "$mypy_pid" || types=$?
cat "$mypy_report"
if [ "$types" -ne 0 ]; then
  echo "test.sh: mypy found type errors (above)" >&2
fi
exit $(( tests != 0 ? tests : types ))
