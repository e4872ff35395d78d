#!/usr/bin/env bash
# Entrypoint of compose.yml's pg-standby: on an empty data volume, copy the
# primary with pg_basebackup -R (which writes primary_conninfo and
# standby.signal), then start PostgreSQL through the image's entrypoint as a
# streaming standby.
set -euo pipefail
PGDATA=${PGDATA:-/var/lib/postgresql/data}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_REPLICATION_PASSWORD:-}" ]; then
    echo "pg-standby: set POSTGRES_REPLICATION_PASSWORD" >&2
    exit 1
  fi
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  find "$PGDATA" -mindepth 1 -delete # a half-finished copy of an earlier attempt
  gosu postgres env PGPASSWORD="$POSTGRES_REPLICATION_PASSWORD" pg_basebackup \
    -d "host=${PRIMARY_HOST:-pg-primary} port=5432 user=replicator application_name=pg-standby" \
    -D "$PGDATA" -R -X stream -c fast -w
  # promoted, it must not wait for a standby of its own
  sed -i '/^synchronous_standby_names/d' "$PGDATA/postgresql.auto.conf"
fi
exec docker-entrypoint.sh "$@"
