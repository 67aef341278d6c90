"""`python -m proxy [--host ADDRESS] [--port PORT]` runs the proxy, like `llama-gate serve`."""

from proxy.cli.serve import main

main()
