#!/usr/bin/env bash
# callflow's local stack on a Debian machine, as root or as a user with sudo-free access.
#
#   scripts/stack.sh setup     venv + project, Redis/PostgreSQL (Debian packages when missing),
#                              LiveKit server (built from its Go module when missing),
#                              local Postgres (54322) and Redis (6379) started, migrations applied
#   scripts/stack.sh run       setup, then every Procfile process + LiveKit in the foreground
#   scripts/stack.sh test      setup, then the whole test suite
#   scripts/stack.sh services  only start local Postgres and Redis (idempotent)
#   scripts/stack.sh stop      stop local Postgres and Redis
#
# Idempotent and fast when already done. Data lives under $CALLFLOW_STATE_DIR (default
# /var/tmp/callflow), a folder the `postgres` user can reach even when the checkout sits under a
# home folder only root can enter. Debian's own cluster on 5432 (if any) is left alone.
# The local Postgres's shared_buffers: $CALLFLOW_PG_SHARED_BUFFERS (default 256MB), read when it
# starts (`scripts/stack.sh stop` first); bench/RESULTS.md ("A year of history") says why one would.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STATE_DIR="${CALLFLOW_STATE_DIR:-/var/tmp/callflow}"
LOCAL_DIR="$ROOT/.local"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
LIVEKIT_VERSION="v1.13.5"
PG_PORT="${CALLFLOW_PG_PORT:-54322}"
REDIS_PORT="${CALLFLOW_REDIS_PORT:-6379}"
LIVEKIT_BIN="${LIVEKIT_BIN:-$LOCAL_DIR/bin/livekit-server}"
TOXIPROXY_VERSION="v2.12.0"
TOXIPROXY_BIN="${TOXIPROXY_BIN:-$LOCAL_DIR/bin/toxiproxy-server}"

log() { printf '\033[1m[callflow]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$d" ] && [ -x "$d/postgres" ] && echo "$d"
}

ensure_debian_packages() {
  local want=()
  command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
  [ -n "$(pg_bindir)" ] || want+=(postgresql postgresql-contrib)
  command -v psql >/dev/null 2>&1 || want+=(postgresql-client)
  command -v runuser >/dev/null 2>&1 || want+=(util-linux)
  command -v wrk >/dev/null 2>&1 || want+=(wrk)  # bench.webhook's load generator
  if [ "${#want[@]}" -gt 0 ]; then
    log "installing Debian packages: ${want[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
}

ensure_venv() {
  local stamp="$VENV/.callflow-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtualenv in .venv"
    "$PY" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    log "installing callflow and its dependencies"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

ensure_livekit() {
  if [ -x "$LIVEKIT_BIN" ]; then return; fi
  if command -v livekit-server >/dev/null 2>&1; then
    mkdir -p "$(dirname "$LIVEKIT_BIN")"
    ln -sf "$(command -v livekit-server)" "$LIVEKIT_BIN"
    return
  fi
  command -v go >/dev/null 2>&1 || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }
  command -v go >/dev/null 2>&1 || { log "Go is needed to build the LiveKit server"; exit 1; }
  log "building the LiveKit server $LIVEKIT_VERSION from its Go module (a few minutes, once)"
  local gobin="$LOCAL_DIR/gobin"
  mkdir -p "$gobin" "$(dirname "$LIVEKIT_BIN")"
  GOBIN="$gobin" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_VERSION"
  mv "$gobin/server" "$LIVEKIT_BIN"
}

ensure_toxiproxy() {
  # The fault tests put Shopify's Toxiproxy between callflow and each dependency (test-only).
  if [ -x "$TOXIPROXY_BIN" ]; then return; fi
  if command -v toxiproxy-server >/dev/null 2>&1; then
    mkdir -p "$(dirname "$TOXIPROXY_BIN")"
    ln -sf "$(command -v toxiproxy-server)" "$TOXIPROXY_BIN"
    return
  fi
  command -v go >/dev/null 2>&1 || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }
  command -v go >/dev/null 2>&1 || { log "Go is needed to build Toxiproxy (the fault tests)"; exit 1; }
  log "building Toxiproxy $TOXIPROXY_VERSION from its Go module (once)"
  local gobin="$LOCAL_DIR/gobin"
  mkdir -p "$gobin" "$(dirname "$TOXIPROXY_BIN")"
  GOBIN="$gobin" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$gobin/server" "$TOXIPROXY_BIN"
}

STARTED_HERE=()

start_postgres() {
  local bindir data sock
  bindir="$(pg_bindir)"
  data="$STATE_DIR/postgres"
  sock="$STATE_DIR/run"
  as_root mkdir -p "$STATE_DIR"
  as_root chmod 755 "$STATE_DIR"
  as_root mkdir -p "$sock" && as_root chown postgres:postgres "$sock"
  if [ ! -s "$data/PG_VERSION" ]; then
    log "initialising PostgreSQL in $data"
    as_root mkdir -p "$data" && as_root chown postgres:postgres "$data" && as_root chmod 700 "$data"
    local pw; pw="$(mktemp)"; echo postgres > "$pw"; chmod 644 "$pw"
    as_root runuser -u postgres -- "$bindir/initdb" -D "$data" -U postgres --pwfile="$pw" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pw"
  fi
  if as_root runuser -u postgres -- "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    return
  fi
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  STARTED_HERE+=(postgres)
  as_root runuser -u postgres -- "$bindir/pg_ctl" -D "$data" -l "$sock/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $sock -c max_connections=300 -c fsync=${CALLFLOW_PG_FSYNC:-on} -c shared_buffers=${CALLFLOW_PG_SHARED_BUFFERS:-256MB}" \
    start >/dev/null
}

start_redis() {
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then return; fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT (append-only file in $STATE_DIR/redis)"
  STARTED_HERE+=(redis)
  as_root mkdir -p "$STATE_DIR/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE_DIR/redis" --appendonly yes \
    --daemonize yes --logfile "$STATE_DIR/redis.log" --pidfile "$STATE_DIR/redis.pid" --save ""
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  log "Redis did not start: see $STATE_DIR/redis.log"; exit 1
}

stop_postgres() {
  local bindir; bindir="$(pg_bindir)"
  as_root runuser -u postgres -- "$bindir/pg_ctl" -D "$STATE_DIR/postgres" -m fast stop >/dev/null 2>&1 || true
}

stop_redis() {
  # Redis keeps its append-only file; SHUTDOWN also rewrites nothing else.
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
}

stop_services() { stop_postgres; stop_redis; }

stop_started_here() {
  local s
  for s in "${STARTED_HERE[@]}"; do
    log "stopping $s"
    "stop_$s"
  done
}

write_livekit_config() {
  # Development key pair of the contract; loopback only; no external-IP discovery.
  local port="${PORT:-8000}"
  mkdir -p "$LOCAL_DIR"
  "$VENV/bin/python" -m workers.cli livekit-config --webhook-url "http://127.0.0.1:$port/livekit/webhook" \
    > "$LOCAL_DIR/livekit.yaml"
}

ensure_demo_bundle() {
  # /demo's script: livekit-client bundled with esbuild (npm), never committed. The browser
  # tests drive Debian's chromium (Playwright from PyPI; `playwright install` is never used).
  local want=()
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
  command -v npm >/dev/null 2>&1 || want+=(nodejs npm)
  if [ "${#want[@]}" -gt 0 ]; then
    log "installing Debian packages: ${want[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
  local demo="$ROOT/web/demo" stamp="$ROOT/web/demo/node_modules/.callflow-installed" lock
  lock="$(sha256sum "$demo/package-lock.json" | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$lock" ]; then
    log "installing the demo page's npm packages (web/demo)"
    (cd "$demo" && npm ci --no-audit --no-fund --loglevel=error) && echo "$lock" > "$stamp"
  fi
  (cd "$demo" && npm run --silent build -- --log-level=warning)
}

setup() {
  ensure_debian_packages
  ensure_venv
  ensure_demo_bundle
  ensure_livekit
  start_postgres
  start_redis
  "$VENV/bin/callflow" migrate
  seed_dev_users
}

seed_dev_users() {
  # The README's try-a-call lines use these two (dev-user prints the existing id when present).
  local name
  for name in Alice Bob; do
    "$VENV/bin/callflow" dev-user "$name" --email "${name,,}@example.com" >/dev/null 2>&1 \
      || { log "could not add the local user ${name,,}@example.com: try \`.venv/bin/callflow dev-user $name\`"; exit 1; }
  done
}

banner() {
  local port="$1" outbox="${CALLFLOW_OUTBOX_DIR:-.local/outbox}"
  cat >&2 <<BANNER

  callflow is starting (Ctrl-C stops everything)
    web       http://127.0.0.1:$port   (/metrics, /readyz)
    demo      http://127.0.0.1:$port/demo
    flower    http://127.0.0.1:${FLOWER_PORT:-5555}
    livekit   ws://127.0.0.1:7880
    emails    $outbox/*.eml   (no RESEND_API_KEY: written there, not sent)
    try       .venv/bin/callflow call --from alice@example.com --to bob@example.com
              .venv/bin/callflow calls

BANNER
}

case "${1:-}" in
  setup) setup ;;
  services) ensure_debian_packages; start_postgres; start_redis ;;
  stop) stop_services ;;
  run)
    setup
    write_livekit_config
    port="${PORT:-8000}"
    { cat Procfile; echo "livekit: $LIVEKIT_BIN --config $LOCAL_DIR/livekit.yaml"; } > "$LOCAL_DIR/Procfile.run"
    # Ctrl-C stops the Procfile processes (honcho) and then the Postgres/Redis this run started.
    export PATH="$VENV/bin:$PATH"   # the Procfile's uvicorn, celery and python are the venv's
    export WEB_HOST="${WEB_HOST:-127.0.0.1}"  # loopback locally; the Procfile's default is all interfaces
    banner "$port"
    trap stop_started_here EXIT
    trap 'exit 130' INT TERM
    # honcho gives the first Procfile entry (web) PORT=$port; the webhook URL points there.
    "$VENV/bin/honcho" start -f "$LOCAL_DIR/Procfile.run" -d "$ROOT" -p "$port" || true
    ;;
  test)
    setup
    ensure_toxiproxy
    shift
    export CALLFLOW_LIVEKIT_BIN="$LIVEKIT_BIN"
    export CALLFLOW_TOXIPROXY_BIN="$TOXIPROXY_BIN"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
