#!/usr/bin/env bash
# Run the whole service locally: `bash scripts/up.sh [process ...]`.
# Sets up .venv and the services, migrates, declares the RabbitMQ topology,
# loads the demo catalogue, then runs Procfile.local (worker pool, outbox
# relay, HTTP shim and the two payment fakes) under honcho.  Ctrl-C stops all.
# Naming processes (e.g. `bash scripts/up.sh worker relay`) starts only those.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh

# a local run: the shipped config/config.yaml holds development secrets and points at the fakes,
# which production mode (the default) refuses
export ORDERS_ENVIRONMENT=${ORDERS_ENVIRONMENT:-development}
export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH" # Procfile.local's `orders` and `python` are the venv's

orders migrate
orders topology
orders products import config/products.demo.json

exec honcho start -f Procfile.local "$@"
