#!/usr/bin/env bash
# A cluster on one machine, without Docker: three RabbitMQ nodes joined in one
# cluster (quorum queues get three members) and a PostgreSQL primary with a
# synchronous standby, run by this machine's own Debian packages
# (rabbitmq-server, PostgreSQL 15 with postgresql-common) on ports of their
# own.  The machine's own servers (rabbit@localhost on 5672/25672,
# PostgreSQL "main" on 5432) are never stopped, reset or reconfigured.
#
#   scripts/cluster.sh up               create what is missing, start what is stopped (idempotent);
#                                       prints the settings (progress goes to stderr)
#   scripts/cluster.sh status           each node, the RabbitMQ cluster's members, which PostgreSQL
#                                       node is primary and the standby's sync state; the settings
#   scripts/cluster.sh env              the settings only
#   scripts/cluster.sh down             stop and remove everything `up` made
#   scripts/cluster.sh failover         stop the PostgreSQL primary (-m immediate), promote the
#                                       standby; the next `up` rebuilds the old primary as its standby
#   scripts/cluster.sh rabbit-stop N    stop RabbitMQ node N (1-3); --app: stop_app only
#   scripts/cluster.sh rabbit-start N   start it again (it rejoins the cluster)
#   scripts/cluster.sh leader QUEUE [VHOST]   the node leading a quorum queue
#
# The settings are `export ORDERS_...=...` lines, also written to
# $CLUSTER_DIR/env (mode 600): `eval "$(scripts/cluster.sh up)"` or
# `. /tmp/orders-cluster/env`.  Passwords are generated on the first `up`.
#
# Layout (override with the environment):
#   CLUSTER_DIR=/tmp/orders-cluster     data, logs, secrets, env (must be reachable by the
#                                       rabbitmq and postgres users)
#   CLUSTER_RABBIT_PREFIX=c             nodes c1@localhost, c2@localhost, c3@localhost
#   CLUSTER_RABBIT_PORT=5673            AMQP ports 5673, 5674, 5675 (127.0.0.1 only)
#   CLUSTER_RABBIT_DIST_PORT=25673      Erlang distribution ports 25673, 25674, 25675
#   CLUSTER_PG_PREFIX=orders            PostgreSQL clusters orders_a and orders_b (pg_lsclusters)
#   CLUSTER_PG_PORT=5442                orders_a on 5442, orders_b on 5443 (127.0.0.1 only)
#
# Authentication: RabbitMQ user `orders` (the cluster has no guest user);
# PostgreSQL role `orders` (owner of database `orders`, CREATEDB) and
# `replicator` (REPLICATION), scram-sha-256 over TCP as postgresql-common sets
# it up.  Administration goes through the local sockets as the rabbitmq and
# postgres users (Erlang cookie, peer authentication), so root is needed.
#
# The database settings name both hosts (host=...,... port=...,...
# target_session_attrs=read-write): libpq tries them in order and keeps the
# one that accepts writes, so after a failover the service finds the new
# primary on its next connection.
set -euo pipefail

CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orders-cluster}
RABBIT_PREFIX=${CLUSTER_RABBIT_PREFIX:-c}
RABBIT_PORT=${CLUSTER_RABBIT_PORT:-5673}
RABBIT_DIST_PORT=${CLUSTER_RABBIT_DIST_PORT:-25673}
PG_PREFIX=${CLUSTER_PG_PREFIX:-orders}
PG_PORT=${CLUSTER_PG_PORT:-5442}

#: RabbitMQ nodes in the cluster
NODES=3
#: the PostgreSQL major version whose Debian packages run the clusters
PG_VERSION=15
#: seconds a RabbitMQ node may take to boot (a first boot on a busy 2-core machine takes 10-30 s)
RABBIT_BOOT_TIMEOUT=120
#: seconds the standby may take to report sync_state = sync
SYNC_TIMEOUT=60
RABBIT_BIN=/usr/lib/rabbitmq/bin
RABBIT_HOME=/var/lib/rabbitmq
PG_SOCKET_DIR=/var/run/postgresql
SERVICE_USER=orders
SERVICE_DB=orders
REPLICATION_USER=replicator
#: ports of the machine's own servers, never ours
RESERVED_PORTS=" 5672 25672 5432 "

SECRETS="$CLUSTER_DIR/secrets"
ENV_FILE="$CLUSTER_DIR/env"
PG_PRIMARY_FILE="$CLUSTER_DIR/pg-primary"
EPMD_PID_FILE="$CLUSTER_DIR/epmd.pid"

log() { printf 'cluster: %s\n' "$*" >&2; }
die() {
  printf 'cluster: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p' >&2
  exit 2
}

preflight() {
  [ "$(id -u)" -eq 0 ] || die "run as root (the nodes run as the rabbitmq and postgres users)"
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "rabbitmq-server is not installed ($RABBIT_BIN)"
  command -v pg_createcluster >/dev/null || die "pg_createcluster is missing (postgresql-common)"
  [ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ] || die "PostgreSQL $PG_VERSION is not installed"
  local port
  for port in $(all_ports); do
    case "$RESERVED_PORTS" in *" $port "*) die "port $port belongs to the machine's own servers" ;; esac
  done
}

all_ports() {
  local n
  for n in $(seq 1 "$NODES"); do
    echo $((RABBIT_PORT + n - 1)) $((RABBIT_DIST_PORT + n - 1))
  done
  echo "$PG_PORT" $((PG_PORT + 1))
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

random_secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

load_secrets() {
  if [ ! -f "$SECRETS" ]; then
    umask 077
    {
      echo "RABBIT_PASSWORD=$(random_secret)"
      echo "PG_PASSWORD=$(random_secret)"
      echo "REPLICATION_PASSWORD=$(random_secret)"
    } >"$SECRETS"
  fi
  # shellcheck disable=SC1090
  . "$SECRETS"
}

make_cluster_dir() {
  mkdir -p "$CLUSTER_DIR/rabbit" "$CLUSTER_DIR/pg"
  chmod 755 "$CLUSTER_DIR" "$CLUSTER_DIR/rabbit" "$CLUSTER_DIR/pg"
  local user
  for user in rabbitmq postgres; do
    runuser -u "$user" -- test -x "$CLUSTER_DIR" ||
      die "$CLUSTER_DIR is not reachable by the $user user (choose a CLUSTER_DIR whose parents are world-searchable)"
  done
}

# ------------------------------------------------------------- RabbitMQ --

node() { echo "${RABBIT_PREFIX}$1@localhost"; }
node_dir() { echo "$CLUSTER_DIR/rabbit/${RABBIT_PREFIX}$1"; }

# rabbitmqctl NODE-NUMBER ARGS...: as the rabbitmq user, whose Erlang cookie the nodes share
rmq() {
  local n=$1
  shift
  (cd / && runuser -u rabbitmq -- env HOME="$RABBIT_HOME" "$RABBIT_BIN/rabbitmqctl" -n "$(node "$n")" "$@")
}

# the Erlang node is up (its app may be stopped)
node_alive() { rmq "$1" -q -t 10 eval 'ok.' >/dev/null 2>&1; }
# the RabbitMQ application runs on it
node_running() { rmq "$1" -q -t 10 eval 'rabbit:is_running().' 2>/dev/null | grep -qx true; }

write_node_files() {
  local n=$1 dir
  dir=$(node_dir "$n")
  mkdir -p "$dir/mnesia" "$dir/log"
  # the system file pins 5672: each node gets its own listener, on loopback only
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$((RABBIT_PORT + n - 1))
loopback_users.guest = true
EOF
  echo '[].' >"$dir/enabled_plugins"
  # instead of /etc/rabbitmq/rabbitmq-env.conf (which names the machine's node):
  # Erlang distribution on loopback only
  cat >"$dir/rabbitmq-env.conf" <<'EOF'
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  chown -R rabbitmq:rabbitmq "$dir"
}

start_node() {
  local n=$1 dir port dist p
  if node_alive "$n"; then
    node_running "$n" || rmq "$n" start_app >&2
    return 0
  fi
  port=$((RABBIT_PORT + n - 1))
  dist=$((RABBIT_DIST_PORT + n - 1))
  for p in "$port" "$dist"; do
    port_in_use "$p" && die "port $p is in use by something else: cannot start $(node "$n")"
  done
  write_node_files "$n"
  dir=$(node_dir "$n")
  log "starting $(node "$n") on 127.0.0.1:$port (distribution $dist)"
  (cd "$dir" && runuser -u rabbitmq -- env HOME="$RABBIT_HOME" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_FEATURE_FLAGS_FILE="$dir/feature_flags" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_PID_FILE="$dir/pid" \
    "$RABBIT_BIN/rabbitmq-server" -detached >/dev/null)
}

wait_node() {
  local n=$1
  if ! rmq "$n" -q wait --timeout "$RABBIT_BOOT_TIMEOUT" "$(node_dir "$n")/pid" >/dev/null 2>&1; then
    tail -n 20 "$(node_dir "$n")/log/$(node "$n").log" >&2 2>/dev/null || true
    die "$(node "$n") did not start within ${RABBIT_BOOT_TIMEOUT}s (log: $(node_dir "$n")/log)"
  fi
}

# NODE-NUMBER -> the members of the cluster it belongs to (disk nodes), one a line
cluster_members() {
  rmq "$1" -q cluster_status --formatter json 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["disk_nodes"]))'
}

join_node() {
  local n=$1
  if cluster_members "$n" | grep -qxF "$(node 1)"; then
    return 0
  fi
  log "joining $(node "$n") to $(node 1)"
  rmq "$n" -q stop_app >&2
  rmq "$n" -q join_cluster "$(node 1)" >&2
  rmq "$n" -q start_app >&2
}

ensure_rabbit_user() {
  if ! rmq 1 -q list_users --formatter json | /usr/bin/python3 -c \
    'import json, sys; sys.exit(0 if sys.argv[1] in {u["user"] for u in json.load(sys.stdin)} else 1)' \
    "$SERVICE_USER"; then
    log "creating RabbitMQ user $SERVICE_USER"
    # the password goes to stdin, never to a command line
    printf '%s\n' "$RABBIT_PASSWORD" | rmq 1 -q add_user "$SERVICE_USER" >/dev/null
    rmq 1 -q set_permissions -p / "$SERVICE_USER" '.*' '.*' '.*' >/dev/null
    # guest (loopback-only, well-known password) has no business on this cluster
    rmq 1 -q delete_user guest >/dev/null 2>&1 || true
  fi
}

rabbit_up() {
  local n
  # start every node first: a node restarting after a full stop waits for its peers
  for n in $(seq 1 "$NODES"); do start_node "$n"; done
  for n in $(seq 1 "$NODES"); do wait_node "$n"; done
  for n in $(seq 2 "$NODES"); do join_node "$n"; done
  ensure_rabbit_user
}

stop_node() {
  local n=$1 pidfile pid
  pidfile="$(node_dir "$n")/pid"
  if node_alive "$n"; then
    log "stopping $(node "$n")"
    rmq "$n" -q stop "$pidfile" >/dev/null 2>&1 || true
  fi
  # a node that did not answer: end the process we started, by its pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q beam "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

# a node that answers, for questions to the cluster
any_running_node() {
  local n
  for n in $(seq 1 "$NODES"); do
    if node_running "$n"; then
      echo "$n"
      return 0
    fi
  done
  return 1
}

# ----------------------------------------------------------- PostgreSQL --

pg_name() { echo "${PG_PREFIX}_$1"; } # a | b
pg_port() { if [ "$1" = a ]; then echo "$PG_PORT"; else echo $((PG_PORT + 1)); fi; }
pg_other() { if [ "$1" = a ]; then echo b; else echo a; fi; }
pg_datadir() { echo "$CLUSTER_DIR/pg/$(pg_name "$1")"; }
pg_exists() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$(pg_name "$1")" '$1 == v && $2 == c {f = 1} END {exit !f}'; }
pg_online() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$(pg_name "$1")" '$1 == v && $2 == c && $4 ~ /^online/ {f = 1} END {exit !f}'; }
pg_conf_file() { echo "/etc/postgresql/$PG_VERSION/$(pg_name "$1")/conf.d/orders-cluster.conf"; }
pg_primary() { cat "$PG_PRIMARY_FILE" 2>/dev/null || echo a; }

# psql on node a|b as postgres over the local socket; SQL on stdin
psql_on() {
  runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$(pg_port "$1")" -d postgres "${@:2}"
}
pg_sql() { psql_on "$1" -c "$2"; }

pg_create() {
  local x=$1 conf
  log "creating PostgreSQL cluster $PG_VERSION/$(pg_name "$x") on 127.0.0.1:$(pg_port "$x")"
  port_in_use "$(pg_port "$x")" && die "port $(pg_port "$x") is in use by something else"
  pg_createcluster --start-conf=manual -p "$(pg_port "$x")" -d "$(pg_datadir "$x")" \
    "$PG_VERSION" "$(pg_name "$x")" >/dev/null
  conf=$(pg_conf_file "$x")
  cat >"$conf" <<'EOF'
# scripts/cluster.sh: streaming replication on loopback
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
synchronous_commit = on
EOF
  chown postgres:postgres "$conf"
}

pg_start() {
  pg_online "$1" || { log "starting $(pg_name "$1")" && pg_ctlcluster "$PG_VERSION" "$(pg_name "$1")" start; }
}

ensure_pg_roles() {
  local p=$1
  # only writes what is missing: a write on a primary whose sync standby is away would wait
  if [ "$(pg_sql "$p" "SELECT count(*) FROM pg_roles WHERE rolname IN ('$SERVICE_USER', '$REPLICATION_USER')")" != 2 ]; then
    log "creating roles $SERVICE_USER and $REPLICATION_USER"
    psql_on "$p" <<SQL
CREATE ROLE $SERVICE_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
CREATE ROLE $REPLICATION_USER LOGIN REPLICATION PASSWORD '$REPLICATION_PASSWORD';
SQL
  fi
  if [ -z "$(pg_sql "$p" "SELECT 1 FROM pg_database WHERE datname = '$SERVICE_DB'")" ]; then
    pg_sql "$p" "CREATE DATABASE $SERVICE_DB OWNER $SERVICE_USER" >/dev/null
  fi
}

# the standby must be rebuilt: missing, an old primary, or following another port
standby_stale() {
  local s=$1 p=$2 dir
  dir=$(pg_datadir "$s")
  [ -f "$dir/standby.signal" ] || return 0
  grep -q "port=$(pg_port "$p")" "$dir/postgresql.auto.conf" || return 0
  return 1
}

pg_rebuild_standby() {
  local s=$1 p=$2 dir
  dir=$(pg_datadir "$s")
  case "$dir" in "$CLUSTER_DIR"/pg/?*) ;; *) die "refusing to empty $dir" ;; esac
  log "making $(pg_name "$s") a standby of $(pg_name "$p") (pg_basebackup)"
  pg_online "$s" && pg_ctlcluster "$PG_VERSION" "$(pg_name "$s")" stop -m fast
  find "$dir" -mindepth 1 -delete
  runuser -u postgres -- env PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
    -d "host=127.0.0.1 port=$(pg_port "$p") user=$REPLICATION_USER application_name=$(pg_name "$s")" \
    -D "$dir" -R -X stream -c fast -w
  # a promoted standby must not wait for a standby of its own
  sed -i '/^synchronous_standby_names/d' "$dir/postgresql.auto.conf"
}

wait_sync() {
  local p=$1 state
  for _ in $(seq 1 "$SYNC_TIMEOUT"); do
    state=$(pg_sql "$p" "SELECT sync_state FROM pg_stat_replication LIMIT 1" 2>/dev/null || true)
    [ "$state" = sync ] && return 0
    sleep 1
  done
  die "the standby is not in sync after ${SYNC_TIMEOUT}s (sync_state: ${state:-none})"
}

pg_up() {
  local p s
  p=$(pg_primary)
  s=$(pg_other "$p")
  echo "$p" >"$PG_PRIMARY_FILE"
  if ! pg_exists "$p"; then
    pg_exists "$s" && die "$(pg_name "$p") is missing while $(pg_name "$s") exists: run down, then up"
    pg_create "$p"
  fi
  [ -f "$(pg_datadir "$p")/standby.signal" ] && die "$(pg_name "$p") is recorded as primary but is a standby"
  pg_start "$p"
  ensure_pg_roles "$p"
  pg_exists "$s" || pg_create "$s"
  standby_stale "$s" "$p" && pg_rebuild_standby "$s" "$p"
  pg_start "$s"
  if [ "$(pg_sql "$p" "SHOW synchronous_standby_names")" != "*" ]; then
    pg_sql "$p" "ALTER SYSTEM SET synchronous_standby_names = '*'" >/dev/null
    pg_sql "$p" "SELECT pg_reload_conf()" >/dev/null
  fi
  wait_sync "$p"
}

# ------------------------------------------------------------- settings --

print_settings() {
  [ -f "$ENV_FILE" ] && cat "$ENV_FILE"
}

write_settings() {
  local n urls="" host="127.0.0.1,127.0.0.1" port
  for n in $(seq 1 "$NODES"); do
    urls+="${urls:+,}amqp://$SERVICE_USER:$RABBIT_PASSWORD@127.0.0.1:$((RABBIT_PORT + n - 1))/"
  done
  port="$(pg_port a),$(pg_port b)"
  umask 077
  cat >"$ENV_FILE" <<EOF
# scripts/cluster.sh: the service's settings for the one-machine cluster (source this file)
export ORDERS_RABBITMQ__URL='$urls'
export ORDERS_DATABASE__HOST='$host'
export ORDERS_DATABASE__PORT='$port'
export ORDERS_DATABASE__TARGET_SESSION_ATTRS='read-write'
export ORDERS_DATABASE__USER='$SERVICE_USER'
export ORDERS_DATABASE__PASSWORD='$PG_PASSWORD'
export ORDERS_DATABASE__DBNAME='$SERVICE_DB'
# for libpq tools (psql, psycopg2) and rabbitmqctl -n
export CLUSTER_DATABASE_DSN='host=$host port=$port target_session_attrs=read-write user=$SERVICE_USER password=$PG_PASSWORD dbname=$SERVICE_DB'
export CLUSTER_RABBITMQ_NODES='$(for n in $(seq 1 "$NODES"); do printf '%s ' "$(node "$n")"; done | sed 's/ $//')'
EOF
}

# --------------------------------------------------------------- verbs --

cmd_up() {
  preflight
  make_cluster_dir
  load_secrets
  local epmd_before
  epmd_before=$(pgrep -x epmd || true)
  rabbit_up
  if [ -z "$epmd_before" ] && [ ! -f "$EPMD_PID_FILE" ]; then
    pgrep -x epmd >"$EPMD_PID_FILE" || true # our first node started it: down ends it
  fi
  pg_up
  write_settings
  log "up: RabbitMQ $(node 1) .. $(node "$NODES"), PostgreSQL primary $(pg_name "$(pg_primary)"); settings in $ENV_FILE"
  print_settings
}

cmd_status() {
  preflight
  local n state r x role
  echo "RabbitMQ"
  for n in $(seq 1 "$NODES"); do
    if node_running "$n"; then state=running; elif node_alive "$n"; then state="app stopped"; else state=down; fi
    printf '  %-24s 127.0.0.1:%-6s %s\n' "$(node "$n")" $((RABBIT_PORT + n - 1)) "$state"
  done
  if r=$(any_running_node); then
    rmq "$r" -q cluster_status --formatter json | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
print("  cluster_status (from %s):" % sys.argv[1])
print("    disk nodes:    %s" % " ".join(sorted(s.get("disk_nodes", []))))
print("    running nodes: %s" % " ".join(sorted(s.get("running_nodes", []))))
print("    partitions:    %s" % (s.get("partitions") or "none"))
print("    alarms:        %s" % (s.get("alarms") or "none"))' "$(node "$r")"
  else
    echo "  no node is running"
  fi
  echo "PostgreSQL"
  for x in a b; do
    if ! pg_exists "$x"; then
      state="missing"
    elif ! pg_online "$x"; then
      state=down
    else
      role=$(pg_sql "$x" "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END")
      state="online $role"
    fi
    printf '  %-24s 127.0.0.1:%-6s %s\n' "$PG_VERSION/$(pg_name "$x")" "$(pg_port "$x")" "$state"
  done
  x=$(pg_primary)
  if pg_online "$x"; then
    echo "  replication from $(pg_name "$x") (synchronous_standby_names = '$(pg_sql "$x" "SHOW synchronous_standby_names")'):"
    pg_sql "$x" "SELECT '    ' || application_name || ' ' || state || ' sync_state=' || sync_state FROM pg_stat_replication" |
      grep . || echo "    no standby connected"
  fi
  if [ -f "$ENV_FILE" ]; then
    echo "Settings ($ENV_FILE)"
    print_settings
  fi
}

cmd_down() {
  preflight
  local n x pid
  for n in $(seq 1 "$NODES"); do stop_node "$n"; done
  for x in a b; do
    if pg_exists "$x"; then
      log "dropping PostgreSQL cluster $PG_VERSION/$(pg_name "$x")"
      # pg_dropcluster leaves a directory holding a file it did not write
      rm -f "$(pg_conf_file "$x")"
      pg_dropcluster --stop "$PG_VERSION" "$(pg_name "$x")"
    fi
  done
  pid=$(cat "$EPMD_PID_FILE" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = epmd ] && ! epmd -names 2>/dev/null | grep -q '^name '; then
    log "stopping epmd (pid $pid, started by up)"
    kill "$pid" 2>/dev/null || true
  fi
  rm -rf "$CLUSTER_DIR"
  log "down: nothing left"
}

cmd_failover() {
  preflight
  local p s
  p=$(pg_primary)
  s=$(pg_other "$p")
  pg_online "$s" || die "the standby $(pg_name "$s") is not running: no failover possible"
  [ "$(pg_sql "$s" "SELECT pg_is_in_recovery()")" = t ] || die "$(pg_name "$s") is not a standby"
  if pg_online "$p"; then
    log "stopping the primary $(pg_name "$p") (-m immediate)"
    pg_ctlcluster "$PG_VERSION" "$(pg_name "$p")" stop -m immediate
  fi
  log "promoting $(pg_name "$s")"
  [ "$(pg_sql "$s" "SELECT pg_promote(true, 60)")" = t ] || die "pg_promote failed on $(pg_name "$s")"
  # it has no standby of its own until the next `up`: writes must not wait for one
  pg_sql "$s" "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
  pg_sql "$s" "SELECT pg_reload_conf()" >/dev/null
  echo "$s" >"$PG_PRIMARY_FILE"
  echo "primary: $PG_VERSION/$(pg_name "$s") on 127.0.0.1:$(pg_port "$s") (run up to rebuild $(pg_name "$p") as its standby)"
}

node_number() {
  if ! [[ ${1:-} =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt "$NODES" ]; then
    die "node number 1..$NODES expected, got '${1:-}'"
  fi
}

cmd_rabbit_stop() {
  preflight
  node_number "${1:-}"
  if [ "${2:-}" = --app ]; then
    rmq "$1" -q stop_app >&2
  else
    stop_node "$1"
  fi
  echo "$(node "$1") stopped"
}

cmd_rabbit_start() {
  preflight
  node_number "${1:-}"
  make_cluster_dir
  start_node "$1"
  wait_node "$1"
  echo "$(node "$1") running"
}

cmd_leader() {
  preflight
  local queue=${1:-} vhost=${2:-/} r leader
  [ -n "$queue" ] || die "usage: cluster.sh leader QUEUE [VHOST]"
  r=$(any_running_node) || die "no RabbitMQ node is running"
  leader=$(rmq "$r" -q list_queues -p "$vhost" name type leader --no-table-headers |
    awk -F '\t' -v q="$queue" '$1 == q {print ($2 == "quorum" ? $3 : "not a quorum queue (" $2 ")")}')
  [ -n "$leader" ] || die "no queue $queue in vhost $vhost"
  echo "$leader"
}

main() {
  local verb=${1:-}
  [ $# -gt 0 ] && shift
  case "$verb" in
    up) cmd_up ;;
    status) cmd_status ;;
    env) print_settings || die "no settings: run up first" ;;
    down) cmd_down ;;
    failover) cmd_failover ;;
    rabbit-stop) cmd_rabbit_stop "$@" ;;
    rabbit-start) cmd_rabbit_start "$@" ;;
    leader) cmd_leader "$@" ;;
    *) usage ;;
  esac
}

main "$@"
