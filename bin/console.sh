#!/usr/bin/env bash
# llama-gate console: install, start, stop and inspect the whole stack on this machine.
#
#   bin/console.sh start              install what is missing, then start Postgres (when local),
#                                     migrate, start the model server, wait until healthy, start
#                                     the proxy, and print the URL and the next command
#   bin/console.sh stop               stop the proxy (draining requests), the backend, Postgres
#   bin/console.sh restart            stop, then start
#   bin/console.sh status             each part: running or not, healthy or not
#   bin/console.sh logs [backend|proxy|db] [-f]
#                                     the last lines of a part's log (all parts by default)
#   bin/console.sh models             the GGUF files in models/, sizes, which is the default
#   bin/console.sh use-model NAME     make NAME the default model and restart the backend
#   bin/console.sh pull REPO FILE     download a GGUF from the Hugging Face hub into models/
#   bin/console.sh install            only run runtime/install.sh
#
# Settings come from the environment, runtime/config.env and .env (see README.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME="$ROOT/runtime"
PY="$RUNTIME/.venv/bin/python"
LOGS="$RUNTIME/logs"
RUN="$RUNTIME/run"
CONFIG="$RUNTIME/config.env"
export LLAMA_GATE_HOME="$ROOT"
# The proxy lets requests finish for 30 s, then flushes audit rows for up to 10 s: never kill
# it before both are done.
STOP_GRACE_SECONDS="${LLAMA_GATE_STOP_GRACE_SECONDS:-60}"
START_TIMEOUT_SECONDS="${LLAMA_GATE_START_TIMEOUT_SECONDS:-180}"

say() { printf '%s\n' "$*"; }
die() { printf 'console.sh: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

ensure_installed() {
  if [ ! -x "$PY" ] || [ ! -f "$CONFIG" ]; then
    say "First run: installing (runtime/install.sh)"
    "$RUNTIME/install.sh"
  fi
}

# Read the settings in force (flags aside) once, through the same code the services use, so the
# script and the services never disagree about ports.
load_settings() {
  local out
  out=$(cd "$ROOT" && "$PY" - <<'PY'
import shlex, sys
from urllib.parse import urlsplit
from proxy.settings import SettingsError, load_settings
try:
    s = load_settings()
except SettingsError as exc:
    sys.exit(f"console.sh: {exc}")
def show(host):
    return "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
for name, value in {
    "SERVER_HOST": s.server_host, "SERVER_PORT": s.server_port,
    "PROXY_HOST": s.proxy_host, "PROXY_PORT": s.proxy_port,
    "PROXY_URL_HOST": show(s.proxy_host), "PROXY_ENABLED": int(s.proxy_enabled),
    "DB_PORT": urlsplit(s.database_dsn.reveal()).port or 5432,
}.items():
    print(f"{name}={shlex.quote(str(value))}")
PY
) || exit 1
  eval "$out"
  LOCAL_PG=0
  grep -q '^LLAMA_GATE_LOCAL_POSTGRES=1' "$CONFIG" 2>/dev/null && LOCAL_PG=1
  return 0
}

pidfile() { echo "$RUN/$1.pid"; }
pid_of() { local f; f=$(pidfile "$1"); [ -f "$f" ] && cat "$f" || true; }
# Running, and not a zombie: a killed part whose parent never reaps it must count as gone.
alive() {
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# GET a URL; exit 0 on a 2xx answer.
http_ok() {
  "$PY" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if 200 <= r.status < 300 else 1)
PY
}

port_busy() {
  "$PY" - "$1" "$2" <<'PY'
import socket, sys
with socket.socket() as s:
    s.settimeout(1)
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}

last_log_lines() { [ -f "$LOGS/$1.log" ] && tail -n "${2:-15}" "$LOGS/$1.log" | sed 's/^/    | /'; }

# start_part NAME HEALTH_URL HOST PORT COMMAND...
start_part() {
  local name=$1 url=$2 host=$3 port=$4; shift 4
  if alive "$name"; then
    if http_ok "$url"; then say "$name: already running (pid $(pid_of "$name"))"; return 0; fi
  elif port_busy "$host" "$port"; then
    die "$name: port $port on $host is already taken by another program; stop it or set a different port (see README.md, Settings)"
  fi
  if ! alive "$name"; then
    mkdir -p "$LOGS" "$RUN"
    printf '\n=== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >> "$LOGS/$name.log"
    (cd "$ROOT" && exec setsid "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null) &
    echo $! > "$(pidfile "$name")"
  fi
  say "$name: starting (pid $(pid_of "$name"), log runtime/logs/$name.log)"
  local waited=0
  until http_ok "$url"; do
    if ! alive "$name"; then
      rm -f "$(pidfile "$name")"
      say "$name: exited during startup. The end of runtime/logs/$name.log:" >&2
      last_log_lines "$name" >&2
      exit 1
    fi
    if [ "$waited" -ge "$START_TIMEOUT_SECONDS" ]; then
      say "$name: not healthy after ${START_TIMEOUT_SECONDS}s; the end of its log:" >&2
      last_log_lines "$name" >&2
      exit 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  say "$name: healthy after ${waited}s"
}

stop_part() {
  local name=$1 pid waited=0
  pid=$(pid_of "$name")
  if [ -z "$pid" ] || ! alive "$name"; then rm -f "$(pidfile "$name")"; return 0; fi
  say "$name: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$name"; do
    if [ "$waited" -ge "$STOP_GRACE_SECONDS" ]; then
      say "$name: still running after ${STOP_GRACE_SECONDS}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1; waited=$((waited + 1))
  done
  rm -f "$(pidfile "$name")"
}

db() { (cd "$ROOT" && "$PY" -m proxy.db.localpg "$1" --datadir "$RUNTIME/pgdata" --port "$DB_PORT" --log "$LOGS/db.log"); }

cmd_start() {
  ensure_installed
  "$RUNTIME/install.sh" >/dev/null  # completes config.env or the model if either went missing
  load_settings
  if [ "$LOCAL_PG" = 1 ]; then
    db start >/dev/null || { last_log_lines db >&2; exit 1; }
    say "db: running on 127.0.0.1:$DB_PORT (data in runtime/pgdata)"
  fi
  (cd "$ROOT" && "$RUNTIME/.venv/bin/llama-gate" init-db) | sed 's/^/db: /'
  start_part backend "http://$SERVER_HOST:$SERVER_PORT/health" "$SERVER_HOST" "$SERVER_PORT" \
    "$PY" -m backend serve
  if [ "$PROXY_ENABLED" = 1 ]; then
    start_part proxy "http://$PROXY_URL_HOST:$PROXY_PORT/health" "$PROXY_URL_HOST" "$PROXY_PORT" \
      "$RUNTIME/.venv/bin/llama-gate" serve
    say ""
    say "llama-gate is up: http://$PROXY_URL_HOST:$PROXY_PORT/v1 (OpenAI-compatible)"
    say "Next: create a user and their API key with"
    say "  bin/user_management_cli.sh create-user --username alice"
  else
    say ""
    say "LLAMA_PROXY_ENABLED=0: the model server alone answers at http://$SERVER_HOST:$SERVER_PORT/v1"
    say "with the single key LLAMA_SERVER_API_KEY from runtime/config.env."
  fi
}

cmd_stop() {
  load_settings
  stop_part proxy
  stop_part backend
  if [ "$LOCAL_PG" = 1 ] && [ -f "$RUNTIME/pgdata/postmaster.pid" ]; then
    say "db: stopping"
    db stop
  fi
  say "stopped"
}

cmd_status() {
  load_settings
  local rc=0 part url
  for part in backend proxy; do
    if [ "$part" = backend ]; then url="http://$SERVER_HOST:$SERVER_PORT/health"
    else
      [ "$PROXY_ENABLED" = 1 ] || { say "proxy: disabled (LLAMA_PROXY_ENABLED=0)"; continue; }
      url="http://$PROXY_URL_HOST:$PROXY_PORT/health"
    fi
    if alive "$part"; then
      if http_ok "$url"; then say "$part: running (pid $(pid_of "$part")), healthy at $url"
      else say "$part: running (pid $(pid_of "$part")) but NOT healthy at $url"; rc=1; fi
    elif [ -f "$(pidfile "$part")" ]; then
      say "$part: CRASHED (pid $(pid_of "$part") is gone). The end of runtime/logs/$part.log:"
      last_log_lines "$part"; rc=1
    else
      say "$part: stopped"; rc=1
    fi
  done
  if [ "$LOCAL_PG" = 1 ]; then
    if db status >/dev/null 2>&1; then say "db: running on 127.0.0.1:$DB_PORT"
    else say "db: stopped"; rc=1; fi
  else
    say "db: external (POSTGRES_AUTH_*), not managed here"
  fi
  return "$rc"
}

cmd_logs() {
  local follow=0 parts=()
  for arg in "$@"; do
    case "$arg" in
      -f|--follow) follow=1 ;;
      backend|proxy|db) parts+=("$arg") ;;
      *) die "logs: unknown part '$arg' (backend, proxy or db)" ;;
    esac
  done
  [ "${#parts[@]}" -gt 0 ] || parts=(backend proxy db)
  local files=()
  for part in "${parts[@]}"; do
    [ -f "$LOGS/$part.log" ] && files+=("$LOGS/$part.log")
  done
  [ "${#files[@]}" -gt 0 ] || die "no logs yet in runtime/logs (has the stack been started?)"
  if [ "$follow" = 1 ]; then exec tail -n 50 -F "${files[@]}"; else tail -n 50 "${files[@]}"; fi
}

cmd_use_model() {
  local name=${1:-}
  [ -n "$name" ] || die "use-model: give a model name (see bin/console.sh models)"
  name=${name%.gguf}
  [ -f "$ROOT/models/$name.gguf" ] || die "use-model: no models/$name.gguf (see bin/console.sh models)"
  ensure_installed
  if grep -q '^LLAMA_MODEL=' "$CONFIG"; then
    sed -i "s|^LLAMA_MODEL=.*|LLAMA_MODEL=$name|" "$CONFIG"
  else
    printf 'LLAMA_MODEL=%s\n' "$name" >> "$CONFIG"
  fi
  say "default model: $name (runtime/config.env)"
  if alive backend; then
    load_settings
    stop_part backend
    start_part backend "http://$SERVER_HOST:$SERVER_PORT/health" "$SERVER_HOST" "$SERVER_PORT" \
      "$PY" -m backend serve
  fi
}

cmd_pull() {
  [ $# -eq 2 ] || die "pull: usage: bin/console.sh pull REPO FILE  (e.g. pull bartowski/SmolLM2-360M-Instruct-GGUF SmolLM2-360M-Instruct-Q4_K_M.gguf)"
  ensure_installed
  cd "$ROOT" && exec "$PY" -m backend pull "$1" "$2"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  logs) shift; cmd_logs "$@" ;;
  models) ensure_installed; cd "$ROOT" && exec "$PY" -m backend models ;;
  use-model) shift; cmd_use_model "$@" ;;
  pull) shift; cmd_pull "$@" ;;
  install) exec "$RUNTIME/install.sh" ;;
  -h|--help|help) usage ;;
  "") usage; exit 2 ;;
  *) say "console.sh: unknown command '$1'" >&2; usage >&2; exit 2 ;;
esac
