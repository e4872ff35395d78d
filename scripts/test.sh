#!/usr/bin/env bash
# Run the tests: `bash scripts/test.sh [pytest args]`.
# Sets up .venv and the services (PostgreSQL, Redis, RabbitMQ), then runs
# pytest.  The tests create their own database, so nothing is migrated here.
# The exit code is pytest's; "no tests collected" (5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit code 5); that is a failure, not a pass" >&2
fi
exit "$status"
