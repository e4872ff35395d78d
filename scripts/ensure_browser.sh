#!/usr/bin/env bash
# Make sure a headless Chromium is at hand for the console's browser tests
# (tests/e2e/test_console_browser.py), the way ensure_services.sh makes sure of
# the servers: Debian's `chromium` package, installed with apt-get (sudo only
# when not root) when /usr/bin/chromium is missing.  Never a downloaded browser:
# Playwright drives this one (executable_path).
#
# Run by scripts/test.sh.  It never fails the run: where no Chromium can be
# installed (no apt-get, no network, not root) it says so, and the browser
# tests skip with the same reason.  ORDERS_TEST_BROWSER names another
# Chromium binary (then nothing is installed).
set -uo pipefail

say() { printf 'ensure_browser: %s\n' "$*"; }

if [ -n "${ORDERS_TEST_BROWSER:-}" ]; then
  if [ -x "$ORDERS_TEST_BROWSER" ]; then say "chromium: $ORDERS_TEST_BROWSER (ORDERS_TEST_BROWSER)"; else say "ORDERS_TEST_BROWSER=$ORDERS_TEST_BROWSER is not an executable: the browser tests will skip"; fi
  exit 0
fi
if [ -x /usr/bin/chromium ]; then
  say "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "no /usr/bin/chromium and no apt-get to install it: the console's browser tests will skip"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    say "no /usr/bin/chromium, and installing it needs root (no sudo): the console's browser tests will skip"
    exit 0
  fi
fi
say "installing Debian's chromium (apt-get) for the console's browser tests ..."
log=$(mktemp)
if $SUDO apt-get update -qq >"$log" 2>&1 &&
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >>"$log" 2>&1; then
  say "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
else
  tail -n 5 "$log" >&2
  say "apt-get install chromium failed: the console's browser tests will skip"
fi
rm -f "$log"
exit 0
