#!/usr/bin/env bash
# Stand-ins for the official base images, made from Debian's packages alone, for a machine that
# reaches Debian's mirror and PyPI but no image registry (docker-compose.yml and the Dockerfile take
# their base images from LLAMA_GATE_POSTGRES_IMAGE and LLAMA_GATE_PYTHON_IMAGE):
#
#   llama-gate-standin/debian:bookworm    `debootstrap --variant=minbase bookworm`, imported
#   llama-gate-standin/python:bookworm    + Debian's python3 (3.11) with venv and pip, standing in
#                                         for python:3.12-slim-bookworm
#   llama-gate-standin/postgres:bookworm  + Debian's PostgreSQL 15 behind an entrypoint that honours
#                                         POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and the data
#                                         volume at /var/lib/postgresql/data like postgres:17
#
# Usage: tests/compose/standins.sh   (root, a running Docker engine and debootstrap; made once:
# run again, it makes only what is missing; DEBIAN_MIRROR overrides http://deb.debian.org/debian)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PREFIX=llama-gate-standin

have() { docker image inspect "$1" >/dev/null 2>&1; }
say() { printf '==> %s\n' "$*"; }

if ! have "$PREFIX/debian:$SUITE"; then
  command -v debootstrap >/dev/null || { echo "standins.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  started=$(date +%s)
  say "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes, once)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if ! debootstrap --variant=minbase "$SUITE" "$work/root" "$MIRROR" > "$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
  fi
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  tar -C "$work/root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$PREFIX/debian:$SUITE" >/dev/null
  rm -rf "$work"
  trap - EXIT
  echo "    $PREFIX/debian:$SUITE in $(( $(date +%s) - started ))s"
fi

for part in python postgres; do
  if ! have "$PREFIX/$part:$SUITE"; then
    started=$(date +%s)
    say "building $PREFIX/$part:$SUITE from Debian's packages"
    DOCKER_BUILDKIT=1 docker build --quiet --build-arg "BASE=$PREFIX/debian:$SUITE" \
      -t "$PREFIX/$part:$SUITE" -f "$HERE/$part.Dockerfile" "$HERE" >/dev/null
    echo "    $PREFIX/$part:$SUITE in $(( $(date +%s) - started ))s"
  fi
done
