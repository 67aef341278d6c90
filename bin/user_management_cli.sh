#!/usr/bin/env bash
# The admin CLI (`llama-gate`) from anywhere, with this checkout's settings.
#   bin/user_management_cli.sh create-user --username alice
#   bin/user_management_cli.sh --help
set -euo pipefail
# shellcheck source=bin/bootstrap_user_cli.sh
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap_user_cli.sh"
exec llama-gate "$@"
