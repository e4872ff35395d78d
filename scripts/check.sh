#!/usr/bin/env bash
# Static checks: `bash scripts/check.sh` (CI runs it before the tests).
# ruff lints and checks formatting (rules in ruff.toml), mypy type-checks the
# service's packages (settings in setup.cfg). Any finding fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh >/dev/null

status=0
.venv/bin/ruff check . || status=1
.venv/bin/ruff format --check . || { echo "check.sh: run '.venv/bin/ruff format .' to format" >&2; status=1; }
.venv/bin/mypy worker handlers schema || status=1
exit "$status"
