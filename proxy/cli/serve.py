"""`llama-gate serve` (also `python -m proxy`): run the proxy in the foreground."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import click
import uvloop
from aiohttp import web

from proxy.app import create_app
from proxy.cli.listen import BACKLOG, Handover, bind, take_over
from proxy.cli.support import OneLineCommand, configure_logging, state
from proxy.cli.workers import WorkersFailed, supervise
from proxy.edge.server import EdgeRunner
from proxy.settings import Settings, SettingsError

log = logging.getLogger(__name__)
# Objects made and not yet freed since the last collection before the youngest generation is
# collected (see _settle_heap).
YOUNG_COLLECTION_THRESHOLD = 5000

# How long a stop (SIGTERM, Ctrl-C) waits for requests in flight, streams included.
SHUTDOWN_SECONDS = 30.0
# After it stops accepting, how long the proxy waits before closing idle connections: one it
# accepted an instant earlier may not have sent its request yet, and would count as idle.
ACCEPTED_GRACE_SECONDS = 1.0
# Enough loop turns for connections accepted in the last one to get their transports.
ATTACH_SECONDS = 0.05


@click.command("serve", cls=OneLineCommand)
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
@click.option(
    "--handover",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A Unix socket: take the listening sockets over from the proxy serving there, then "
    "offer them there to the next one (how bin/console.sh restarts without refusing a "
    "connection).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Run this many proxy processes on the one port, to use more than one core (default: "
    "LLAMA_PROXY_WORKERS, 1). With more than one they share the backends' slots, the fair order "
    "and every limit through Postgres.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write this process's id to this file once it serves.",
)
def serve(
    host: str | None,
    port: int | None,
    handover: Path | None,
    workers: int | None,
    ready_file: Path | None,
) -> None:
    """Run the proxy: check API keys and rate limits, stream requests to the model server.

    It forwards to LLAMA_SERVER_HOST:LLAMA_SERVER_PORT with LLAMA_SERVER_API_KEY, and stops
    gracefully on SIGTERM or Ctrl-C, letting requests in flight finish for up to 30 s.

    With --workers N it runs N proxy processes accepting on the same port (one per core uses
    them all); they share backend slots and the fair order through Postgres.

    Example:

        llama-gate serve --host 127.0.0.1 --port 8001 --workers 2
    """
    cli_state = state()
    cli_state.overrides["LLAMA_PROXY_HOST"] = host
    cli_state.overrides["LLAMA_PROXY_PORT"] = None if port is None else str(port)
    cli_state.overrides["LLAMA_PROXY_WORKERS"] = None if workers is None else str(workers)
    settings = cli_state.settings()
    logging.getLogger("proxy").setLevel(logging.INFO)
    if not settings.server_api_key:
        log.warning(
            "LLAMA_SERVER_API_KEY is empty: anything on this host can use the backend directly, "
            "bypassing keys and limits. Set it for both the backend and the proxy."
        )
    where = f"{settings.proxy_host}:{settings.proxy_port}"
    sockets = take_over(handover, settings.proxy_host, settings.proxy_port) if handover else None
    if sockets:
        log.info("took the listening sockets on %s over from the running proxy", where)
    else:
        try:
            sockets = bind(settings.proxy_host, settings.proxy_port)
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {where}: {exc.strerror or exc}. "
                "Choose another --port or stop what uses it."
            ) from None
    log.info(
        "llama-gate proxy listening on %s, forwarding to %s, keys in %s%s",
        where,
        settings.backend_url,
        settings.database_label,
        f", {settings.workers} workers" if settings.workers > 1 else "",
    )
    try:
        app = create_app(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    timeout = settings.header_timeout_seconds
    if settings.workers == 1:
        ready = (lambda: _write_pid(ready_file)) if ready_file else None
        _run(app, sockets, handover, ready, timeout)
    else:
        try:
            supervise(
                settings.workers,
                sockets,
                # each worker its own app: nothing of the parent's is shared but the sockets
                lambda index, ready: _run(
                    create_app(_worker_settings(settings, index)), sockets, None, ready, timeout
                ),
                handover,
                ready_file,
            )
        except WorkersFailed as exc:
            raise click.ClickException(str(exc)) from None
    log.info("llama-gate proxy stopped")


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: only worker 0 serves the dashboard and /metrics (a port is one
    listener's, and dashboard sessions live in one process's memory)."""
    if index == 0:
        return settings
    return settings.model_copy(update={"dashboard_port": 0, "metrics_port": 0})


def _run(
    app: web.Application,
    sockets: list[socket.socket],
    handover: Path | None,
    ready: Callable[[], None] | None,
    header_timeout: float,
) -> None:
    # uvloop: the same event loop, in C (measured: ~15% less CPU per request, bench/overhead.py).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, sockets, handover, ready, header_timeout))


async def _serve(
    app: web.Application,
    sockets: list[socket.socket],
    handover_path: Path | None,
    ready: Callable[[], None] | None,
    header_timeout: float,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests in flight finish;
    `ready()` once it serves.

    The edge's runner (`proxy.edge.server`) answers malformed HTTP in one line; aiohttp's
    keep-alive timer, set to `header_timeout`, cuts off request heads that dribble in.
    """
    runner = EdgeRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=header_timeout,
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    # Handled from before the app starts: a stop asked for meanwhile (a worker whose parent
    # died as it started) ends it cleanly once started, its presence row deleted, rather than
    # killing it half-started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await runner.setup()
    _settle_heap()  # before accepting: no request waits for its one full collection
    handover = Handover(handover_path, sockets) if handover_path else None
    try:
        sites = [web.SockSite(runner, sock, backlog=BACKLOG) for sock in sockets]
        for site in sites:
            await site.start()
        if handover:
            handover.start()
        if ready and not stop.is_set():
            ready()
        await stop.wait()
        log.info("stopping: no new connections; requests in flight may finish")
        if handover:
            await handover.close()
        # Stop accepting before closing: asyncio gives a connection it accepted its transport
        # one loop turn later, and resets it if the server closed in between. A successor
        # holding the same sockets goes on accepting from the same queue.
        for sock in sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(ATTACH_SECONDS)
        for site in sites:
            await site.stop()
        await asyncio.sleep(ACCEPTED_GRACE_SECONDS)
    finally:
        if handover:
            await handover.close()
        await runner.cleanup()


def _settle_heap() -> None:
    """Put what the process made to serve (modules, the app, its pools) out of the garbage
    collector's sight: it lives as long as the process, and a full collection walked all of it
    while every stream waited (a one-off probe timing collections in the proxy under
    bench/overhead.py's c=32 SSE load saw 37 and 105 ms, the largest gaps streams had). Garbage
    is collected first, so none of it is kept for good.

    Then the youngest generation is collected only once 5000 new objects outlive their use
    (CPython's default: 700). Requests in flight hold more than 700 between them at c=32, so
    collections kept running only to find them still in use (a one-off probe: ~340 a second,
    with the older generations' ~16 us a request); under 5000 they almost never run, and one
    takes ~1 ms when it does."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def _write_pid(path: Path) -> None:
    path.write_text(f"{os.getpid()}\n")


def main() -> None:
    """`python -m proxy`: the same as `llama-gate serve`, with its options."""
    configure_logging()
    serve(prog_name="python -m proxy")
