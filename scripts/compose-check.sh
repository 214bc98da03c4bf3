#!/usr/bin/env bash
# Proves the Docker path end to end: `docker compose up --build`, then real calls through the
# containers, then `docker compose stop` and `down -v`. Meant for a Debian machine without access
# to a container registry (run as root, or as a user of the `docker` group who may sudo for apt,
# debootstrap and dockerd): the public base images are replaced by local stand-ins built from
# Debian's packages. Not part of `make test` (1½ minutes; 4 or more the first time).
#
#   scripts/compose-check.sh            (or: make compose-check)
#
# What it does, each step timed:
#   1. tools: Debian's docker.io (its daemon is started when not running), debootstrap, and the
#      Docker Compose CLI plugin built from its Go module when `docker compose` is missing
#   2. stand-ins for the base images (built once, then reused; CALLFLOW_STANDINS_REBUILD=1 redoes
#      them): a debootstrap minbase of Debian bookworm carrying this machine's CA bundle, and on it
#      Python 3.11, Node.js, redis-server, postgresql-15 and the LiveKit server the set-up builds
#      ($LIVEKIT_BIN, default .local/bin/livekit-server). Set PYTHON_IMAGE, NODE_IMAGE, REDIS_IMAGE,
#      POSTGRES_IMAGE, LIVEKIT_IMAGE to use real images instead (then no stand-in is built).
#   3. `docker compose build`: the callflow image's size; it must run as a non-root user and hold
#      no secret; a `callflow --help` in a new container is timed
#   4. `docker compose up -d`: migrate must exit 0, every service run, web's /readyz answer 200
#   5. scripts/compose_drive.py from the host: an answered call and a missed one (see its header)
#   6. every service with a health check healthy
#   7. `docker compose stop` while an invitation rings: every app process must exit by itself on
#      SIGTERM (no SIGKILL) and `callflow tasks failed` must list nothing
#   8. `docker compose up -d` again: that invitation ends missed and its email is written
#   9. `docker compose down -v` (also on failure, after printing the services' last log lines)
# Exits non-zero on any failure. Compose's own output goes to $WORK/compose.log. The compose project is `callflow-check` (not the `callflow` a user
# runs); web, Postgres, Redis and Flower are published on free ports; LiveKit needs 7880, 7881 and
# 7882/udp free (its ICE candidates name them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STANDINS="$ROOT/scripts/compose-standins"
VENV="${VENV:-$ROOT/.venv}"
WORK="${CALLFLOW_STATE_DIR:-/var/tmp/callflow}/compose-check"
LIVEKIT_VERSION="$(sed -n 's/^LIVEKIT_VERSION="\(.*\)"$/\1/p' scripts/stack.sh)"
LIVEKIT_BIN="${LIVEKIT_BIN:-$ROOT/.local/bin/livekit-server}"
COMPOSE_VERSION="${COMPOSE_VERSION:-v5.6.0}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PROJECT="${COMPOSE_CHECK_PROJECT:-callflow-check}"
RING_TIMEOUT=30  # the development default of CALLFLOW_RING_TIMEOUT_SECONDS
export PATH="$PATH:/usr/local/go/bin"

log() { printf '\033[1m[compose-check]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
now() { date +%s.%N; }
T_START="$(now)"
SUMMARY=()

# step NAME COMMAND...: runs it, prints and remembers how long it took.
step() {
  local name="$1" t0 t1 secs
  shift
  log "$name ..."
  t0="$(now)"
  "$@"
  t1="$(now)"
  secs="$(printf '%.1f' "$(echo "$t1 - $t0" | bc)")"
  SUMMARY+=("$(printf '%-44s %7s s' "$name" "$secs")")
  log "$name: ${secs} s"
}

apt_install() {
  log "installing Debian packages: $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. tools -------------------------------------------------------------------------------------

ensure_docker() {
  local want=()
  command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
  command -v docker >/dev/null 2>&1 || want+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
  command -v bc >/dev/null 2>&1 || want+=(bc)
  command -v curl >/dev/null 2>&1 || want+=(curl)
  command -v ss >/dev/null 2>&1 || want+=(iproute2)
  [ "${#want[@]}" -eq 0 ] || apt_install $(printf '%s\n' "${want[@]}" | sort -u)
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: $WORK/dockerd.log)"
    as_root mkdir -p "$WORK"
    as_root sh -c "nohup dockerd >'$WORK/dockerd.log' 2>&1 &"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start: see $WORK/dockerd.log"; exit 1; }
  fi
}

ensure_compose() {
  # env_file's `required: false` needs Compose >= 2.24 (Debian's docker-compose 1.29 cannot read it).
  if docker compose version >/dev/null 2>&1; then return; fi
  command -v go >/dev/null 2>&1 || { log "Go is needed to build the Docker Compose plugin"; exit 1; }
  log "building Docker Compose $COMPOSE_VERSION from its Go module (a few minutes, once)"
  # `go install` refuses the module (its go.mod has exclude directives): build it in its own folder.
  local dir plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  dir="$(go mod download -json "github.com/docker/compose/v5@$COMPOSE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [ -d "$dir" ] || { log "could not download github.com/docker/compose/v5@$COMPOSE_VERSION"; exit 1; }
  mkdir -p "$plugins"
  (cd "$dir" && GOFLAGS="${GOFLAGS:--buildvcs=false}" go build -trimpath \
     -ldflags "-w -X github.com/docker/compose/v5/internal.Version=$COMPOSE_VERSION" \
     -o "$plugins/docker-compose" ./cmd)
  docker compose version >/dev/null
}

tools() {
  ensure_docker
  ensure_compose
  # The driver runs on the host, in the project's virtualenv (as `make setup` makes it).
  if ! "$VENV/bin/python" -c 'import livekit.rtc, psycopg' >/dev/null 2>&1; then
    log "installing callflow and its dependencies into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
  fi
  log "$(docker version --format 'Docker engine {{.Server.Version}}'), $(docker compose version)"
}

# --- 2. stand-ins for the public base images ---------------------------------------------------------

STANDIN_BASE="callflow-standin/debian:bookworm"
image_missing() { [ "${CALLFLOW_STANDINS_REBUILD:-0}" = 1 ] || ! docker image inspect "$1" >/dev/null 2>&1; }

standin_base() {
  image_missing "$STANDIN_BASE" || return 0
  local rootfs="$WORK/rootfs"
  as_root rm -rf "$rootfs"
  as_root mkdir -p "$rootfs"
  log "debootstrap --variant=minbase bookworm (about a minute)"
  as_root debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  # This machine's CA bundle (it may hold a TLS-inspecting proxy's CA): kept as a local
  # certificate too, so an update-ca-certificates inside an image keeps it.
  as_root cp "$CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
  as_root cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  as_root tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    -c 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
    -c 'CMD ["bash"]' - "$STANDIN_BASE" >/dev/null
  as_root rm -rf "$rootfs"
}

standin() {  # standin NAME TAG [extra files to put in its build context]
  local name="$1" tag="$2" ctx
  shift 2
  image_missing "$tag" || return 0
  ctx="$WORK/ctx-$name"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp "$STANDINS/$name.Dockerfile" "$ctx/Dockerfile"
  for f in "$@"; do cp "$f" "$ctx/"; done
  log "building $tag"
  docker build -q --build-arg "BASE=$STANDIN_BASE" -t "$tag" "$ctx" >> "$WORK/standins.log" 2>&1 \
    || { tail -30 "$WORK/standins.log" >&2; return 1; }
  rm -rf "$ctx"
}

ensure_livekit_bin() {
  [ -x "$LIVEKIT_BIN" ] && return
  command -v go >/dev/null 2>&1 || { log "no LiveKit server at $LIVEKIT_BIN and no Go to build it"; exit 1; }
  log "building the LiveKit server $LIVEKIT_VERSION from its Go module (a few minutes, once)"
  mkdir -p "$WORK/gobin" "$(dirname "$LIVEKIT_BIN")"
  GOBIN="$WORK/gobin" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_VERSION"
  mv "$WORK/gobin/server" "$LIVEKIT_BIN"
}

standins() {
  # A variable already set names a real image: nothing to stand in for.
  local need=0 v
  for v in PYTHON_IMAGE NODE_IMAGE REDIS_IMAGE POSTGRES_IMAGE LIVEKIT_IMAGE; do [ -n "${!v:-}" ] || need=1; done
  [ "$need" = 1 ] || return 0
  standin_base
  if [ -z "${PYTHON_IMAGE:-}" ]; then standin python callflow-standin/python:3.11; export PYTHON_IMAGE=callflow-standin/python:3.11; fi
  if [ -z "${NODE_IMAGE:-}" ]; then standin node callflow-standin/node:bookworm; export NODE_IMAGE=callflow-standin/node:bookworm; fi
  if [ -z "${REDIS_IMAGE:-}" ]; then
    standin redis callflow-standin/redis:7 "$STANDINS/redis-entrypoint.sh"
    export REDIS_IMAGE=callflow-standin/redis:7
  fi
  if [ -z "${POSTGRES_IMAGE:-}" ]; then
    standin postgres callflow-standin/postgres:15 "$STANDINS/postgres-entrypoint.sh"
    export POSTGRES_IMAGE=callflow-standin/postgres:15
  fi
  if [ -z "${LIVEKIT_IMAGE:-}" ]; then
    ensure_livekit_bin
    standin livekit "callflow-standin/livekit:$LIVEKIT_VERSION" "$(readlink -f "$LIVEKIT_BIN")"
    export LIVEKIT_IMAGE="callflow-standin/livekit:$LIVEKIT_VERSION"
  fi
}

# --- 3-7. the stack ------------------------------------------------------------------------------------

compose() { docker compose -p "$PROJECT" "$@"; }
# The same, its output in the log (shown when it fails).
quiet() {
  local rc=0
  echo "+ docker compose $*" >> "$WORK/compose.log"
  docker compose -p "$PROJECT" "$@" >> "$WORK/compose.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { tail -30 "$WORK/compose.log" >&2; log "docker compose $* failed ($rc)"; }
  return "$rc"
}

build() {
  quiet build
  local bytes
  bytes="$(docker image inspect -f '{{.Size}}' callflow:latest)"
  IMAGE_SIZE="$(echo "scale=0; $bytes / 1000000" | bc) MB"
  IMAGE_USER="$(docker image inspect -f '{{.Config.User}}' callflow:latest)"
  local base
  base="$(docker image inspect -f '{{.Size}}' "${PYTHON_IMAGE:-python:3.11-slim}")"
  IMAGE_OWN="$(echo "scale=0; ($bytes - $base) / 1000000" | bc) MB"
  log "callflow:latest: $IMAGE_SIZE ($IMAGE_OWN on top of ${PYTHON_IMAGE:-python:3.11-slim}), runs as user '${IMAGE_USER:-root}'"
  [ -n "$IMAGE_USER" ] && [ "$IMAGE_USER" != root ] && [ "$IMAGE_USER" != 0 ] || { log "the image runs as root"; return 1; }
  # No secret in the image's configuration (its environment) nor in its files.
  if docker image inspect -f '{{join .Config.Env "\n"}}' callflow:latest | grep -Eiq '(SECRET|API_KEY|PASSWORD|TOKEN|PRIVATE_KEY)='; then
    log "the image's environment holds a secret-looking variable"; return 1
  fi
  if docker run --rm --entrypoint sh callflow:latest -c 'ls -a /app; ls /app/.local' | grep -Eq '^\.env$|\.pem$|\.p8$'; then
    log "the image holds a .env or key file"; return 1
  fi
  # Cold start of one process in the image: `callflow --help` imports the CLI and its settings.
  local t0 t1
  t0="$(now)"; docker run --rm callflow:latest callflow --help >/dev/null; t1="$(now)"
  IMAGE_START="$(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s"
}

ports_free() {
  local p
  for p in 7880 7881; do
    if ss -ltn "sport = :$p" | grep -q LISTEN; then log "port $p is in use: LiveKit's container needs it"; return 1; fi
  done
  if ss -lun "sport = :7882" | grep -q 7882; then log "port 7882/udp is in use: LiveKit's container needs it"; return 1; fi
}

up() {
  ports_free
  export WEB_HOST_PORT POSTGRES_HOST_PORT REDIS_HOST_PORT FLOWER_HOST_PORT
  WEB_HOST_PORT="$(free_port)"; POSTGRES_HOST_PORT="$(free_port)"; REDIS_HOST_PORT="$(free_port)"; FLOWER_HOST_PORT="$(free_port)"
  UP_T0="$(now)"
  quiet up -d --no-build
  local deadline=$((SECONDS + 180)) code
  while :; do
    code="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -aq migrate)" 2>/dev/null || true)"
    case "$code" in
      "exited 0") break ;;
      exited*) log "migrate failed ($code)"; return 1 ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || { log "migrate did not finish"; return 1; }
    sleep 0.5
  done
  until curl -fsS "http://127.0.0.1:$WEB_HOST_PORT/readyz" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { log "web never became ready"; return 1; }
    sleep 0.5
  done
  local t1 started; t1="$(now)"
  STACK_START="$(printf '%.1f' "$(echo "$t1 - $UP_T0" | bc)") s"
  started="$(date -d "$(docker inspect -f '{{.State.StartedAt}}' "$(compose ps -aq web)")" +%s.%N)"
  WEB_START="$(printf '%.1f' "$(echo "$t1 - $started" | bc)") s"
  local s state
  for s in redis postgres livekit web listener worker beat flower; do
    state="$(docker inspect -f '{{.State.Status}}' "$(compose ps -aq "$s")")"
    [ "$state" = running ] || { log "$s is $state"; return 1; }
  done
}

# Every long-running service still running, and healthy where it has a health check (the worker's
# first check comes 30 s after its start: its interval).
healthy() {
  local deadline=$((SECONDS + 90)) s state
  for s in redis postgres livekit web listener worker beat flower; do
    until state="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$(compose ps -aq "$s")")" \
          && { [ "$state" = "running healthy" ] || [ "$state" = "running none" ]; }; do
      case "$state" in running*) ;; *) log "$s is $state"; return 1 ;; esac
      [ "$SECONDS" -lt "$deadline" ] || { log "$s is $state, not healthy"; return 1; }
      sleep 1
    done
  done
  compose ps --format 'table {{.Service}}\t{{.Status}}' >&2
}

driver() {
  "$VENV/bin/python" scripts/compose_drive.py "$@" --web "http://127.0.0.1:$WEB_HOST_PORT" \
    --database-url "postgresql://postgres:postgres@127.0.0.1:$POSTGRES_HOST_PORT/postgres" \
    --compose "docker compose -p $PROJECT" --ring-timeout "$RING_TIMEOUT"
}

calls() { driver calls; }

# Stopped while an invitation rings (the worker holds its ring-timeout countdown).
stop() {
  RINGING="$(driver ring)"
  local t0; t0="$(now)"
  quiet stop
  # An app process that ignored SIGTERM is killed after the grace period (10 s): exit code 137.
  local s code finished bad=0
  for s in web listener beat flower worker redis postgres livekit; do
    read -r code finished < <(docker inspect -f '{{.State.ExitCode}} {{.State.FinishedAt}}' "$(compose ps -aq "$s")")
    log "$(printf '%-9s exit code %-3s %5.1f s after the stop began' "$s" "$code" \
      "$(echo "$(date -d "$finished" +%s.%N) - $t0" | bc)")"
    case "$s:$code" in
      redis:*|postgres:*|livekit:*) ;;  # not ours; shown for the record
      *:0|*:143) ;;                     # 143: ended by SIGTERM's default action, still clean
      *) bad=1 ;;
    esac
  done
  [ "$bad" = 0 ] || { log "a process did not stop cleanly on SIGTERM"; return 1; }
  # Nothing the stop interrupted may be recorded as a failed task.
  quiet start postgres
  local out
  out="$(compose run --rm --no-deps -T migrate callflow tasks failed 2>>"$WORK/compose.log")"
  echo "$out" >&2
  [ "$out" = "(no failed tasks)" ] || { log "tasks were recorded as failed"; return 1; }
}

# Up again: the invitation left ringing ends missed, with its email, once its deadline has passed.
restart() {
  quiet up -d --no-build
  local deadline=$((SECONDS + 120))
  until curl -fsS "http://127.0.0.1:$WEB_HOST_PORT/readyz" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { log "web never became ready again"; return 1; }
    sleep 0.5
  done
  driver missed --invitation "$RINGING"
}

# The services' logs are kept in $WORK/services.log; a traceback or an ERROR line in them fails the check.
down() {
  compose logs --no-color --timestamps > "$WORK/services.log" 2>&1 || true
  quiet down -v --remove-orphans
  local bad
  bad="$(grep -cE 'Traceback|\bERROR\b|\bCRITICAL\b' "$WORK/services.log" || true)"
  if [ "$bad" != 0 ]; then
    grep -E 'Traceback|\bERROR\b|\bCRITICAL\b' "$WORK/services.log" | head -20 >&2
    log "$bad error lines in the services' logs ($WORK/services.log)"
    return 1
  fi
}

STACK_UP=0
on_exit() {
  local rc=$?
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      log "FAILED: the services' last log lines:"
      compose logs --no-color --tail 40 >&2 || true
    fi
    down >/dev/null 2>&1 || true
  fi
  if [ "$rc" = 0 ]; then return; fi
  log "compose-check FAILED (exit $rc)"
}
trap on_exit EXIT

mkdir -p "$WORK"
: > "$WORK/compose.log"
step "1. tools (docker, compose, debootstrap)" tools
step "2. base image stand-ins" standins
step "3. docker compose build" build
STACK_UP=1
step "4. docker compose up -d (until web ready)" up
step "5. calls through the containers" calls
step "6. every service healthy" healthy
step "7. docker compose stop mid-ring (SIGTERM)" stop
step "8. up again: the ringing one ends missed" restart
step "9. docker compose down -v" down
STACK_UP=0

total="$(printf '%.1f' "$(echo "$(now) - $T_START" | bc)")"
echo
echo "compose-check passed ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores)"
printf '  %s\n' "${SUMMARY[@]}"
printf '  %-44s %7s s\n' "total" "$total"
echo "  callflow image: $IMAGE_SIZE ($IMAGE_OWN on top of $PYTHON_IMAGE), user ${IMAGE_USER};"
echo "  'callflow --help' in a new container: $IMAGE_START;"
echo "  web's container start until its /readyz answers 200: $WEB_START;"
echo "  'docker compose up -d' (fresh volumes) until web's /readyz answers 200: $STACK_START"
