#!/bin/sh
# One-shot service of compose.yml's `cluster` profile: a random Erlang cookie,
# made once and kept in the rabbit-cookie volume that the three nodes share.
set -eu
if [ ! -s /cookie/erlang.cookie ]; then
  umask 077
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >/cookie/erlang.cookie
fi
