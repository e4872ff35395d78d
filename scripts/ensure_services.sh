#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer where the configuration says.
#
# Idempotent: a service that already answers is left alone.  A service on a
# local address that does not answer is installed from Debian's packages if
# missing (apt-get, sudo only when not root) and started; where apt-get is not
# available but `docker compose` is, the services of compose.yml are started
# instead.  Each service gets a deadline; the script polls, prints one line
# per service and exits non-zero if any of them cannot be brought up.
#
# Addresses come from the service's settings (config/config.yaml or the file
# in ORDERS_CONFIG, overridden by ORDERS_<SECTION>__<KEY>) when the project's
# venv can read them, otherwise from ORDERS_DATABASE__HOST/PORT,
# ORDERS_REDIS__HOST/PORT and ORDERS_RABBITMQ__URL with the defaults
# 127.0.0.1:5432, :6379 and :5672.
#
# Run by scripts/test.sh (ORDERS_ENSURE_SERVICES_FOR_TESTS=1), it starts nothing with
# ORDERS_TEST_SERVERS=containers, and a service it cannot bring up does not stop the
# run (unless ORDERS_TEST_SERVERS=local): pytest starts it in Docker, or says what is
# missing (docs/testing.md).
#
# PostgreSQL authentication: the service connects as `postgres`, by default
# without a password.  For a local server where that login fails (a fresh
# Debian cluster uses scram-sha-256 for TCP), this script adds
# `host all all 127.0.0.1/32 trust` and the same for ::1 at the top of
# pg_hba.conf and reloads: trust on loopback only, a local development
# setting.  Set ORDERS_DATABASE__PASSWORD to use a password instead; the
# script then never touches pg_hba.conf.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

#: Seconds each service may take to answer after it was started.
PG_DEADLINE=60
REDIS_DEADLINE=30
RABBIT_DEADLINE=120 # a first boot of RabbitMQ takes 10-20 s, more on a slow disk

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

log() { printf '%s\n' "$*"; }
#: set by scripts/test.sh: the tests can do without this script's servers (pytest then uses those that
#: answer, starts the others in Docker with testcontainers, or stops naming what is missing)
FOR_TESTS=${ORDERS_ENSURE_SERVICES_FOR_TESTS:-0}
die() {
  printf 'ensure_services: %s\n' "$*" >&2
  if [ "$FOR_TESTS" = 1 ] && [ "${ORDERS_TEST_SERVERS:-}" != local ]; then
    printf 'ensure_services: going on to the tests, which start what is missing in Docker where a daemon answers\n' >&2
    exit 0
  fi
  exit 1
}

if [ "$FOR_TESTS" = 1 ] && [ "${ORDERS_TEST_SERVERS:-}" = containers ]; then
  log "ORDERS_TEST_SERVERS=containers: the tests start PostgreSQL, RabbitMQ and Redis in Docker; nothing started here"
  exit 0
fi

# ---------------------------------------------------------------- settings --

read_settings_from_python() {
  local py="$REPO/.venv/bin/python"
  [ -x "$py" ] || return 1
  (cd "$REPO" && "$py" - <<'EOF'
from urllib.parse import urlsplit
from worker.settings import load_settings
s = load_settings()
u = urlsplit(s.rabbitmq.url.get_secret_value())
default_port = 5671 if u.scheme == "amqps" else 5672
for value in (s.database.host, s.database.port, s.database.user,
              s.database.password.get_secret_value(),
              s.redis.host, s.redis.port, u.hostname or "127.0.0.1", u.port or default_port):
    print(value)
EOF
  )
}

# host and port out of amqp[s]://user:pass@host:port/vhost (IPv6 in brackets)
parse_amqp_url() {
  local url=$1 rest scheme default_port=5672 host port
  scheme=${url%%://*}
  [ "$scheme" = "amqps" ] && default_port=5671
  rest=${url#*://}
  rest=${rest##*@}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  if [ "${rest:0:1}" = "[" ]; then
    host=${rest#[}; host=${host%%]*}
    port=${rest##*]}; port=${port#:}
  elif [[ $rest == *:* ]]; then
    host=${rest%%:*}; port=${rest##*:}
  else
    host=$rest; port=""
  fi
  printf '%s\n%s\n' "${host:-127.0.0.1}" "${port:-$default_port}"
}

if mapfile -t _settings < <(read_settings_from_python 2>/dev/null) && [ "${#_settings[@]}" -eq 8 ]; then
  DB_HOST=${_settings[0]} DB_PORT=${_settings[1]} DB_USER=${_settings[2]} DB_PASSWORD=${_settings[3]}
  REDIS_HOST=${_settings[4]} REDIS_PORT=${_settings[5]}
  RABBIT_HOST=${_settings[6]} RABBIT_PORT=${_settings[7]}
else
  DB_HOST=${ORDERS_DATABASE__HOST:-127.0.0.1} DB_PORT=${ORDERS_DATABASE__PORT:-5432}
  DB_USER=${ORDERS_DATABASE__USER:-postgres} DB_PASSWORD=${ORDERS_DATABASE__PASSWORD:-}
  REDIS_HOST=${ORDERS_REDIS__HOST:-127.0.0.1} REDIS_PORT=${ORDERS_REDIS__PORT:-6379}
  mapfile -t _amqp < <(parse_amqp_url "${ORDERS_RABBITMQ__URL:-amqp://guest:guest@127.0.0.1:5672/}")
  RABBIT_HOST=${_amqp[0]} RABBIT_PORT=${_amqp[1]}
fi

# ------------------------------------------------------------------ probes --

THIS_HOST=$(hostname 2>/dev/null || true)
is_local() {
  case "$1" in
    localhost | 127.* | ::1 | 0.0.0.0 | "$THIS_HOST") return 0 ;;
    *) return 1 ;;
  esac
}

port_open() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1; }

postgres_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$DB_HOST" -p "$DB_PORT" -t 2 # refuses while the server is still starting
  else
    port_open "$DB_HOST" "$DB_PORT"
  fi
}

redis_ready() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 2 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else
    port_open "$REDIS_HOST" "$REDIS_PORT"
  fi
}

rabbitmq_ready() { port_open "$RABBIT_HOST" "$RABBIT_PORT"; } # AMQP listener opens last in boot

# ---------------------------------------------------------------- starting --

APT_UPDATED=0
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_install() { # packages...
  [ "$#" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    die "need to install $* but I am not root and sudo is missing"
  fi
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update ..."
    $SUDO apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "apt-get install -y $* ..."
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
    die "apt-get install $* failed"
}

have_docker_compose() { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

START_LOG=$(mktemp)
trap 'rm -f "$START_LOG"' EXIT

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

start_postgres() {
  local ver cluster
  ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$ver" ] || { echo "no PostgreSQL server under /usr/lib/postgresql" >>"$START_LOG"; return 1; }
  # the cluster that listens on the configured port, else a new one
  cluster=$(pg_lsclusters -h 2>/dev/null | awk -v port="$DB_PORT" '$3 == port { print $1, $2; exit }')
  if [ -z "$cluster" ]; then
    if [ -d "/etc/postgresql/$ver/main" ]; then
      echo "cluster $ver/main exists but does not use port $DB_PORT (see pg_lsclusters)" >>"$START_LOG"
      return 1
    fi
    log "postgres: creating cluster $ver/main on port $DB_PORT"
    $SUDO pg_createcluster --port "$DB_PORT" "$ver" main >>"$START_LOG" 2>&1 || return 1
    cluster="$ver main"
  fi
  # shellcheck disable=SC2086 # "$ver $name" splits into two arguments on purpose
  $SUDO pg_ctlcluster --skip-systemctl-redirect $cluster start >>"$START_LOG" 2>&1 || true
}

start_redis() {
  local bind=127.0.0.1
  [ "$REDIS_HOST" = "::1" ] && bind="::1"
  redis-server --daemonize yes --bind "$bind" --port "$REDIS_PORT" --save "" --appendonly no \
    >>"$START_LOG" 2>&1 || true
}

start_rabbitmq() {
  # The Debian wrapper switches to the rabbitmq user itself when run as root.
  $SUDO rabbitmq-server -detached >>"$START_LOG" 2>&1 || true
}

# ---------------------------------------------------------------- the work --

# name|package|host|port|deadline|compose-service
SERVICES=(
  "postgres|postgresql|$DB_HOST|$DB_PORT|$PG_DEADLINE|postgres"
  "redis|redis-server|$REDIS_HOST|$REDIS_PORT|$REDIS_DEADLINE|redis"
  "rabbitmq|rabbitmq-server|$RABBIT_HOST|$RABBIT_PORT|$RABBIT_DEADLINE|rabbitmq"
)

declare -A STARTED_AT=()
down=()
remote_down=0
for entry in "${SERVICES[@]}"; do
  IFS='|' read -r name pkg host port deadline compose_name <<<"$entry"
  if "${name}_ready"; then
    log "$(printf '%-9s %s:%s  up (already running)' "$name" "$host" "$port")"
  elif ! is_local "$host"; then
    log "$(printf '%-9s %s:%s  DOWN: not a local address, so not started here' "$name" "$host" "$port")"
    remote_down=1
  else
    down+=("$entry")
  fi
done

if [ "${#down[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    missing=()
    for entry in "${down[@]}"; do
      IFS='|' read -r name pkg _ <<<"$entry"
      pkg_installed "$pkg" || missing+=("$pkg")
    done
    apt_install "${missing[@]}"
    for entry in "${down[@]}"; do
      IFS='|' read -r name _ <<<"$entry"
      log "$name: starting ..."
      STARTED_AT[$name]=$(date +%s)
      "start_${name}" || { cat "$START_LOG" >&2; die "$name: could not be started"; }
    done
  elif have_docker_compose; then
    compose_services=()
    for entry in "${down[@]}"; do
      IFS='|' read -r name _ _ _ _ compose_name <<<"$entry"
      compose_services+=("$compose_name")
    done
    log "no apt-get here: docker compose up -d ${compose_services[*]} ..."
    docker compose -f "$REPO/compose.yml" up -d "${compose_services[@]}" ||
      die "docker compose up -d ${compose_services[*]} failed"
    for entry in "${down[@]}"; do # deadlines start once the images are pulled
      STARTED_AT[${entry%%|*}]=$(date +%s)
    done
  else
    die "cannot start ${down[*]%%|*}: neither apt-get nor docker compose is available; start them yourself"
  fi

  for entry in "${down[@]}"; do
    IFS='|' read -r name pkg host port deadline _ <<<"$entry"
    until "${name}_ready"; do
      if [ "$(date +%s)" -ge $((STARTED_AT[$name] + deadline)) ]; then
        cat "$START_LOG" >&2
        die "$name at $host:$port did not answer within ${deadline}s after it was started"
      fi
      sleep 0.5
    done
    log "$(printf '%-9s %s:%s  up (started, %ss)' "$name" "$host" "$port" $(($(date +%s) - STARTED_AT[$name])))"
  done
fi

[ "$remote_down" -eq 0 ] || die "a remote service does not answer; start it or point the configuration elsewhere"

# ------------------------------------------------- PostgreSQL login check --

pg_login() {
  PGPASSWORD="$DB_PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -w -q -h "$DB_HOST" -p "$DB_PORT" \
    -U "$DB_USER" -d postgres -tAc 'SELECT 1' >/dev/null 2>"$START_LOG"
}

if ! command -v psql >/dev/null 2>&1; then
  log "postgres: psql not installed, login not checked"
elif ! pg_login; then
  if is_local "$DB_HOST" && [ -z "$DB_PASSWORD" ] && grep -qiE 'password|authentication' "$START_LOG" &&
    hba=$(as_postgres psql -X -p "$DB_PORT" -tAc 'SHOW hba_file' 2>/dev/null) && [ -n "$hba" ]; then
    log "postgres: $DB_USER cannot log in over TCP without a password; trusting loopback in $hba (local development)"
    tmp=$(mktemp)
    {
      echo "# added by order-worker scripts/ensure_services.sh: local development, trust loopback"
      echo "host    all    all    127.0.0.1/32    trust"
      echo "host    all    all    ::1/128         trust"
      $SUDO cat "$hba"
    } >"$tmp"
    $SUDO cp "$tmp" "$hba" # cp onto the existing file keeps its owner and mode
    rm -f "$tmp"
    as_postgres psql -X -p "$DB_PORT" -tAc 'SELECT pg_reload_conf()' >/dev/null
    pg_login || { cat "$START_LOG" >&2; die "postgres: $DB_USER still cannot log in"; }
  else
    cat "$START_LOG" >&2
    die "postgres: cannot log in as $DB_USER at $DB_HOST:$DB_PORT (set ORDERS_DATABASE__USER/PASSWORD)"
  fi
fi
