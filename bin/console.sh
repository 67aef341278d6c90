#!/usr/bin/env bash
# llama-gate console: install, start, stop and inspect the whole stack on this machine.
#
#   bin/console.sh start              install what is missing, then start Postgres (when local),
#                                     migrate, start the model server, wait until healthy, start
#                                     the proxy, and print the URL and the next command
#   bin/console.sh stop               stop the proxy (draining requests), the backend, Postgres
#   bin/console.sh restart [backend|proxy]
#                                     restart the backend and the proxy (or one of them); the new
#                                     proxy takes the port over before the old one stops, so no
#                                     connection is refused
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
LOCK_TIMEOUT_SECONDS="${LLAMA_GATE_LOCK_TIMEOUT_SECONDS:-900}"
# The proxy hands its listening sockets to its successor here (relative to $ROOT: a Unix socket
# path may not be longer than 107 bytes).
HANDOVER=runtime/run/proxy.sock
READY=runtime/run/proxy.ready

say() { printf '%s\n' "$*"; }
die() { printf 'console.sh: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

ensure_installed() {
  if [ ! -x "$PY" ] || [ ! -f "$CONFIG" ]; then
    say "First run: installing (runtime/install.sh)"
    "$RUNTIME/install.sh"
  fi
}

# One console.sh at a time changes the stack: two concurrent starts would both launch every part.
# The lock is fd 9, closed in every part started (a part holding it would hold it forever).
lock() {
  mkdir -p "$RUN"
  exec 9>"$RUN/console.lock"
  if ! flock -n 9; then
    say "waiting for another bin/console.sh to finish (runtime/run/console.lock)"
    flock -w "$LOCK_TIMEOUT_SECONDS" 9 \
      || die "another bin/console.sh has held runtime/run/console.lock for ${LOCK_TIMEOUT_SECONDS}s; try again when it is done"
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
def db_port(dsn):
    try:
        return urlsplit(dsn).port or 5432
    except ValueError:  # several hosts: not the local database anyway
        return 5432
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
    "DB_PORT": db_port(s.database_dsn.reveal()),
}.items():
    print(f"{name}={shlex.quote(str(value))}")
PY
) || exit 1
  eval "$out"
  LOCAL_PG=0
  grep -q '^LLAMA_GATE_LOCAL_POSTGRES=1' "$CONFIG" 2>/dev/null && LOCAL_PG=1
  return 0
}

# A pid file holds "PID START": START is the process's start time (field 22 of /proc/PID/stat),
# so a pid the system has since given to another program is never taken for ours.
pidfile() { echo "$RUN/$1.pid"; }
pid_in() { [ -f "$1" ] && { read -r pid _ < "$1"; echo "${pid:-}"; } || true; }
pid_of() { pid_in "$(pidfile "$1")"; }
start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }  # what follows "(comm)", which may itself hold spaces
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}
record_pid() { printf '%s %s\n' "$2" "$(start_time "$2")" > "$1"; }
# What each part's command line holds, for pid files written before start times were recorded.
marker() { case "$1" in backend) echo "-m backend serve" ;; *) echo "llama-gate serve" ;; esac; }
# ours PIDFILE NAME: its process runs, is no zombie (a killed part nobody reaped counts as gone),
# and is the one we started.
ours() {
  local file=$1 name=$2 pid recorded
  [ -f "$file" ] || return 1
  read -r pid recorded < "$file" || true
  [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ -d "/proc/$pid" ] || return 0  # no /proc here: kill -0 is all there is to ask
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  if [ -n "${recorded:-}" ]; then
    [ "$(start_time "$pid")" = "$recorded" ]
  else
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(marker "$name")"
  fi
}
alive() { ours "$(pidfile "$1")" "$1"; }

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

# launch NAME PIDFILE COMMAND...: run a part detached, in its own session, logging to its log.
launch() {
  local name=$1 file=$2; shift 2
  mkdir -p "$LOGS" "$RUN"
  printf '\n=== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >> "$LOGS/$name.log"
  (cd "$ROOT" && exec setsid "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null 9>&-) &
  record_pid "$file" $!
}

# start_part NAME HEALTH_URL HOST PORT COMMAND...
start_part() {
  local name=$1 url=$2 host=$3 port=$4; shift 4
  if alive "$name"; then
    if http_ok "$url"; then say "$name: already running (pid $(pid_of "$name"))"; return 0; fi
  elif port_busy "$host" "$port"; then
    die "$name: port $port on $host is already taken by another program; stop it or set a different port (see README.md, Settings)"
  fi
  if ! alive "$name"; then
    launch "$name" "$(pidfile "$name")" "$@"
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

# stop_part NAME [PIDFILE]: SIGTERM, then SIGKILL after the grace period; only ever our process.
stop_part() {
  local name=$1 file=${2:-$(pidfile "$1")} pid waited=0
  pid=$(pid_in "$file")
  if [ -z "$pid" ]; then rm -f "$file"; return 0; fi
  if ! ours "$file" "$name"; then
    if kill -0 "$pid" 2>/dev/null; then
      say "$name: pid $pid (runtime/run/$(basename "$file")) is no longer ours but another program's; leaving it alone"
    fi
    rm -f "$file"; return 0
  fi
  say "$name: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while ours "$file" "$name"; do
    if [ "$waited" -ge "$STOP_GRACE_SECONDS" ]; then
      say "$name: still running after ${STOP_GRACE_SECONDS}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1; waited=$((waited + 1))
  done
  rm -f "$file"
}

# (Kept apart from its flags: tests/test_compose.py checks compose runs the same command.)
PROXY_COMMAND=("$RUNTIME/.venv/bin/llama-gate" serve)
PROXY_COMMAND+=(--handover "$HANDOVER" --ready-file "$READY")

# The new proxy takes the listening sockets over from the running one (see proxy/cli/listen.py),
# and only once it serves is the old one stopped: no connection is refused meanwhile. Should the
# new one fail, the old one keeps serving.
restart_proxy() {
  if ! alive proxy; then
    start_part proxy "http://$PROXY_URL_HOST:$PROXY_PORT/health" "$PROXY_URL_HOST" "$PROXY_PORT" \
      "${PROXY_COMMAND[@]}"
    return
  fi
  if [ ! -S "$ROOT/$HANDOVER" ]; then  # a proxy from before handovers: a short gap then
    stop_part proxy
    start_part proxy "http://$PROXY_URL_HOST:$PROXY_PORT/health" "$PROXY_URL_HOST" "$PROXY_PORT" \
      "${PROXY_COMMAND[@]}"
    return
  fi
  local new_file="$RUN/proxy.new.pid" new waited=0
  rm -f "$ROOT/$READY"
  launch proxy "$new_file" "${PROXY_COMMAND[@]}"
  new=$(pid_in "$new_file")
  say "proxy: starting a new proxy (pid $new) next to the running one (pid $(pid_of proxy))"
  until [ "$(cat "$ROOT/$READY" 2>/dev/null)" = "$new" ]; do
    if ! ours "$new_file" proxy || [ "$waited" -ge $((START_TIMEOUT_SECONDS * 5)) ]; then
      stop_part proxy "$new_file" >/dev/null
      say "proxy: the new proxy did not start; the old one (pid $(pid_of proxy)) keeps serving. The end of runtime/logs/proxy.log:" >&2
      last_log_lines proxy >&2
      exit 1
    fi
    sleep 0.2; waited=$((waited + 1))  # fifths of a second
  done
  stop_part proxy
  mv "$new_file" "$(pidfile proxy)"
  say "proxy: restarted (pid $new) without refusing a connection"
}

db() { (cd "$ROOT" && "$PY" -m proxy.db.localpg "$1" --datadir "$RUNTIME/pgdata" --port "${DB_PORT:-55432}" --log "$LOGS/db.log" 9>&-); }

cmd_start() {
  ensure_installed
  # Completes config.env or the model if either went missing; it prints only what it does (a
  # llama-cpp-python build shows its progress).
  LLAMA_GATE_INSTALL_QUIET=1 "$RUNTIME/install.sh"
  load_settings
  if [ "$LOCAL_PG" = 1 ]; then
    db start >/dev/null || { last_log_lines db >&2; exit 1; }
    say "db: running on 127.0.0.1:$DB_PORT (data in runtime/pgdata)"
  fi
  (cd "$ROOT" && "$RUNTIME/.venv/bin/llama-gate" init-db 9>&-) | sed 's/^/db: /'
  start_part backend "http://$SERVER_HOST:$SERVER_PORT/health" "$SERVER_HOST" "$SERVER_PORT" \
    "$PY" -m backend serve
  if [ "$PROXY_ENABLED" = 1 ]; then
    start_part proxy "http://$PROXY_URL_HOST:$PROXY_PORT/health" "$PROXY_URL_HOST" "$PROXY_PORT" \
      "${PROXY_COMMAND[@]}"
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

# Stopping needs no settings: pid files say what runs, and a broken config.env must not leave the
# stack running with no way to stop it.
cmd_stop() {
  local problem
  if ! problem=$(load_settings 2>&1 >/dev/null); then
    say "settings do not load (${problem#console.sh: }); stopping what runtime/run names" >&2
    LOCAL_PG=0
    grep -q '^LLAMA_GATE_LOCAL_POSTGRES=1' "$CONFIG" 2>/dev/null && LOCAL_PG=1
  else
    load_settings
  fi
  stop_part proxy
  stop_part backend
  if [ "$LOCAL_PG" = 1 ] && [ -f "$RUNTIME/pgdata/postmaster.pid" ]; then
    say "db: stopping"
    db stop
  fi
  say "stopped"
}

cmd_restart() {
  local parts=("$@") part
  [ "${#parts[@]}" -gt 0 ] || parts=(backend proxy)
  for part in "${parts[@]}"; do
    case "$part" in backend|proxy) ;; *) die "restart: unknown part '$part' (backend or proxy)" ;; esac
  done
  ensure_installed
  LLAMA_GATE_INSTALL_QUIET=1 "$RUNTIME/install.sh"
  load_settings
  if [ "$LOCAL_PG" = 1 ]; then
    db start >/dev/null || { last_log_lines db >&2; exit 1; }
  fi
  (cd "$ROOT" && "$RUNTIME/.venv/bin/llama-gate" init-db 9>&-) | sed 's/^/db: /'
  for part in "${parts[@]}"; do
    if [ "$part" = backend ]; then
      stop_part backend
      start_part backend "http://$SERVER_HOST:$SERVER_PORT/health" "$SERVER_HOST" "$SERVER_PORT" \
        "$PY" -m backend serve
    elif [ "$PROXY_ENABLED" = 1 ]; then
      restart_proxy
    else
      stop_part proxy
    fi
  done
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
      local gone="is gone"
      kill -0 "$(pid_of "$part")" 2>/dev/null && gone="now belongs to another program"
      say "$part: CRASHED (pid $(pid_of "$part") $gone). The end of runtime/logs/$part.log:"
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
  start) lock; cmd_start ;;
  stop) lock; cmd_stop ;;
  restart) shift; lock; cmd_restart "$@" ;;
  status) cmd_status ;;
  logs) shift; cmd_logs "$@" ;;
  models) ensure_installed; cd "$ROOT" && exec "$PY" -m backend models ;;
  use-model) shift; lock; cmd_use_model "$@" ;;
  pull) shift; cmd_pull "$@" ;;
  install) lock; exec "$RUNTIME/install.sh" ;;
  -h|--help|help) usage ;;
  "") usage; exit 2 ;;
  *) say "console.sh: unknown command '$1'" >&2; usage >&2; exit 2 ;;
esac
