"""`llama-gate serve` (also `python -m proxy`): run the proxy in the foreground."""

from __future__ import annotations

import asyncio
import logging

import click

from proxy.app import create_app
from proxy.cli.support import state
from proxy.edge import server as edge

log = logging.getLogger(__name__)

# How long a stop (SIGTERM, Ctrl-C) waits for requests in flight, streams included.
SHUTDOWN_SECONDS = 30.0


@click.command("serve")
@click.option(
    "--host",
    metavar="ADDRESS",
    help="Listen on this address (default: LLAMA_PROXY_HOST, 0.0.0.0).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Listen on this port (default: LLAMA_PROXY_PORT, 8001).",
)
def serve(host: str | None, port: int | None) -> None:
    """Run the proxy: check API keys and rate limits, stream requests to the model server.

    It forwards to LLAMA_SERVER_HOST:LLAMA_SERVER_PORT with LLAMA_SERVER_API_KEY, and stops
    gracefully on SIGTERM or Ctrl-C, letting requests in flight finish for up to 30 s.

    Example:

        llama-gate serve --host 127.0.0.1 --port 8001
    """
    cli_state = state()
    cli_state.overrides["LLAMA_PROXY_HOST"] = host
    cli_state.overrides["LLAMA_PROXY_PORT"] = None if port is None else str(port)
    settings = cli_state.settings()
    logging.getLogger("proxy").setLevel(logging.INFO)
    if not settings.server_api_key:
        log.warning(
            "LLAMA_SERVER_API_KEY is empty: anything on this host can use the backend directly, "
            "bypassing keys and limits. Set it for both the backend and the proxy."
        )
    log.info(
        "llama-gate proxy listening on %s:%d, forwarding to %s, keys in %s",
        settings.proxy_host,
        settings.proxy_port,
        settings.backend_url,
        settings.database_label,
    )
    try:
        asyncio.run(
            edge.serve(
                create_app(settings),
                settings.proxy_host,
                settings.proxy_port,
                header_timeout=settings.header_timeout_seconds,
                shutdown_timeout=SHUTDOWN_SECONDS,
            )
        )
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.proxy_host}:{settings.proxy_port}: "
            f"{exc.strerror or exc}. Choose another --port or stop what uses it."
        ) from None
    log.info("llama-gate proxy stopped")


def main() -> None:
    """`python -m proxy`: the same as `llama-gate serve`, with its options."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve(prog_name="python -m proxy")
