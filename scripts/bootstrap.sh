#!/usr/bin/env bash
# Shared first steps of scripts/up.sh and scripts/test.sh:
#   1. create .venv if missing (python3 -m venv; $PYTHON picks another interpreter),
#   2. pip install -e '.[test,dev]', skipped while setup.cfg/setup.py are unchanged
#      since the last successful install (a hash stamp inside .venv),
#   3. scripts/ensure_services.sh (PostgreSQL, Redis, RabbitMQ).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.order-worker-install

say() { printf 'bootstrap: %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null 2>&1 || { say "$PYTHON not found: install Python 3.11 or newer" >&2; exit 1; }
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { say "$("$PYTHON" -V 2>&1) is too old: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1; }
  say "creating $VENV with $("$PYTHON" -V 2>&1)"
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian's own python3 ships venv/ensurepip separately.
    if command -v apt-get >/dev/null 2>&1; then
      sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_=sudo
      pyver=$("$PYTHON" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
      say "python3 -m venv failed: installing python3-venv ($pyver-venv)"
      $sudo_ apt-get update -qq && $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv "$pyver-venv" >/dev/null
      rm -rf "$VENV"
    fi
    "$PYTHON" -m venv "$VENV" || { say "could not create $VENV (on Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
fi

want=$(cat setup.cfg setup.py | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/orders" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  say "dependencies up to date"
else
  say "pip install -e '.[test,dev]' ..."
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,dev]'
  echo "$want" >"$STAMP"
fi

bash scripts/ensure_services.sh
