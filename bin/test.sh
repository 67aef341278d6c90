#!/usr/bin/env bash
# The test command: installs whatever is missing (runtime/install.sh --dev), then runs the linter,
# the type checker and the whole test suite, end-to-end tests with the real model included.
# Extra arguments go to pytest, e.g. `bin/test.sh -k cli -x`.
# Tests start their own throwaway Postgres unless TEST_DATABASE_URL names one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runtime/install.sh --dev
export PATH="$PWD/runtime/.venv/bin:$PATH"
echo "==> ruff"
ruff check .
echo "==> mypy --strict"
mypy
echo "==> pytest"
exec pytest "$@"
