#!/bin/sh
# Entrypoint of the RabbitMQ nodes of compose.yml's `cluster` profile: the
# shared Erlang cookie (made once by the rabbit-cookie service) becomes the
# node's, then the image's own entrypoint starts the server.
set -eu
if [ -z "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  echo "rabbit-node: set RABBITMQ_CLUSTER_PASSWORD (the password of the cluster's user 'orders')" >&2
  exit 1
fi
install -o rabbitmq -g rabbitmq -m 400 /run/rabbit-cookie/erlang.cookie /var/lib/rabbitmq/.erlang.cookie
exec docker-entrypoint.sh rabbitmq-server
