#!/usr/bin/env bash
# Run the tests: `bash scripts/test.sh [pytest args]`.
# Sets up .venv and the services (PostgreSQL, Redis, RabbitMQ) and Chromium for
# the browser tests, then runs pytest.  Where a server cannot be started here but Docker runs, pytest starts
# it in a container (ORDERS_TEST_SERVERS=local|containers forces one way).
# The tests create their own database, so nothing is migrated here.
# The exit code is pytest's; "no tests collected" (5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# the tests can start missing servers in Docker themselves: ensure_services.sh does not stop them
ORDERS_ENSURE_SERVICES_FOR_TESTS=1 bash scripts/bootstrap.sh
# headless Chromium (Debian's) for the console's browser tests; never stops the run (they skip, saying why)
bash scripts/ensure_browser.sh

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit code 5); that is a failure, not a pass" >&2
fi
exit "$status"
