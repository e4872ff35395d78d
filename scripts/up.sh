#!/usr/bin/env bash
# Run the whole service locally: `bash scripts/up.sh [process ...]`.
# Sets up .venv and the services, migrates, declares the RabbitMQ topology,
# loads the demo catalogue, then runs Procfile.local (worker pool, outbox
# relay, HTTP shim and the two payment fakes) under honcho.  Ctrl-C stops all.
# Naming processes (e.g. `bash scripts/up.sh worker relay`) starts only those.
# On a terminal the logs are readable (ORDERS_LOGGING__FORMAT=console unless set),
# elsewhere JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."

# Decided by the terminal up.sh (so honcho) writes to: honcho's processes write to
# a pipe, where `logging.format: auto` would always choose JSON.
if [ -t 1 ] && [ -z "${ORDERS_LOGGING__FORMAT:-}" ]; then
  export ORDERS_LOGGING__FORMAT=console
fi

# Ctrl-C must stop everything whatever the output goes to. With `up.sh | tee up.log`
# the terminal's SIGINT kills tee too; honcho then died writing "SIGINT received" to
# the closed pipe before stopping its processes (each runs in a session of its own,
# out of Ctrl-C's reach) and hung waiting for them. So off a terminal, output passes
# through a forwarder that ignores the signals and, once nobody reads, keeps reading and
# drops it: honcho never writes to a closed pipe and stops its processes as usual.
forward_output() { trap '' INT TERM HUP PIPE; { cat || exec cat >/dev/null; } 2>/dev/null; }
[ -t 1 ] || exec 1> >(forward_output)
[ -t 2 ] || exec 2> >(forward_output >&2)

bash scripts/bootstrap.sh

# a local run: the shipped config/config.yaml holds development secrets and points at the fakes,
# which production mode (the default) refuses
export ORDERS_ENVIRONMENT=${ORDERS_ENVIRONMENT:-development}
export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH" # Procfile.local's `orders` and `python` are the venv's

orders migrate
orders topology
orders products import config/products.demo.json

# the fakes complete payments as the providers do: PayPal's approval and Stripe's 3-D Secure outcome
# arrive as signed webhooks at the shim (see Procfile.local). PayPal's are signed with a certificate
# from a local CA made here, whose https host is the PayPal fake's second listener (:12113); the
# service is told to trust that CA and host for this run only (never in production).
PKI=.local/paypal-pki
python scripts/fakes/paypal_certs.py "$PKI" >/dev/null
export ORDERS_PAYPAL__CERT_CA_FILE="$PWD/$PKI/paypal-ca.pem"
export ORDERS_PAYPAL__CERT_HOST_ALLOWLIST='["127.0.0.1:12113"]'
export FAKE_WEBHOOK_URL="http://127.0.0.1:${ORDERS_SHIM__PORT:-8000}/orders/payment-confirmation"

exec honcho start -f Procfile.local "$@"
