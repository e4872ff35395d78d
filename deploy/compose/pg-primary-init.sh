#!/usr/bin/env bash
# Init script of compose.yml's pg-primary (/docker-entrypoint-initdb.d, run
# once, when the data volume is created): the role the standby replicates
# with, its pg_hba.conf line, and synchronous replication to any standby.
set -euo pipefail
if [ -z "${POSTGRES_REPLICATION_PASSWORD:-}" ]; then
  echo "pg-primary-init: set POSTGRES_REPLICATION_PASSWORD" >&2
  exit 1
fi
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  --set password="$POSTGRES_REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE replicator WITH LOGIN REPLICATION PASSWORD :'password';
-- a commit returns once the standby has flushed it: a failover loses no acked write
ALTER SYSTEM SET synchronous_standby_names = '*';
SQL
# the image's own line (`host all all all ...`) does not cover replication connections
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
