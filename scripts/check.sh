#!/usr/bin/env bash
# Static checks: `bash scripts/check.sh` (CI runs it before the tests).
# ruff lints and checks formatting (rules in ruff.toml), mypy type-checks the
# service's packages (settings in setup.cfg), scripts/check_docs.py checks that
# every name README.md and docs/ give (CLI verbs, settings, queues, routes,
# files) exists, scripts/check_asyncapi.py fails when docs/asyncapi.yaml is not
# what the code generates or not valid AsyncAPI 3.0. Any finding fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh >/dev/null

status=0
.venv/bin/ruff check . || status=1
.venv/bin/ruff format --check . || { echo "check.sh: run '.venv/bin/ruff format .' to format" >&2; status=1; }
.venv/bin/mypy worker handlers schema || status=1
.venv/bin/python scripts/check_docs.py || status=1
.venv/bin/python scripts/check_asyncapi.py || status=1
exit "$status"
