#!/usr/bin/env bash
# Prepares the environment for the admin CLI: makes sure runtime/.venv has llama-gate installed
# and points the CLI at this checkout's settings (runtime/config.env, .env).
# Source it to get `llama-gate` on PATH in your shell:  . bin/bootstrap_user_cli.sh
_lg_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -x "$_lg_root/runtime/.venv/bin/llama-gate" ]; then
  echo "llama-gate is not installed yet; running runtime/install.sh first" >&2
  "$_lg_root/runtime/install.sh" >&2 || { echo "install failed; see the messages above" >&2; return 1 2>/dev/null || exit 1; }
fi
export LLAMA_GATE_HOME="$_lg_root"
case ":$PATH:" in
  *":$_lg_root/runtime/.venv/bin:"*) ;;
  *) export PATH="$_lg_root/runtime/.venv/bin:$PATH" ;;
esac
unset _lg_root
