"""Probes: `/health` says the process is alive; `/ready` that it can serve requests; `/` what
this server is.

None needs a key, and none is recorded as an API request. `/ready` checks Postgres with one
trivial query and probes each backend's `/health`, which never waits for the model lock (see
`proxy.upstream.probes`). It is ready while Postgres and at least one backend answer, naming any
backend that does not; otherwise it answers 503 naming what failed.
"""

from __future__ import annotations

import asyncio
from importlib import metadata

from aiohttp import web

from proxy.appkeys import AUTH_LISTENER, BACKENDS, DATABASE, SETTINGS
from proxy.db import queries
from proxy.db.connect import DatabaseUnavailable

PATHS = frozenset({"/health", "/ready", "/"})
# Where each API lives, for clients finding their way (GET /).
APIS = {
    "openai": "/v1",
    "jsonrpc": "/rpc",
    "stream": "/stream",
    "models": "/models",
    "set_model": "/setModel",
    "restore_cache": "/restore_cache",
}


LOCAL_ADDRESSES = frozenset({"127.0.0.1", "::1"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/", status)


def _version() -> str:
    try:
        return metadata.version("llama-gate")
    except metadata.PackageNotFoundError:
        return "unknown"


async def status(request: web.Request) -> web.Response:
    """What this server is: name, version, whether it can serve, its models and APIs.

    From what the backend probes last found (no backend or database is asked), and nothing
    about any user.
    """
    backends = request.app[BACKENDS]
    body = {
        "name": "llama-gate",
        "version": _version(),
        "ready": any(backends.is_up(upstream.name) for upstream in backends.upstreams),
        "models": backends.models() or [],
        "default_model": backends.default_model(),
        "apis": APIS,
    }
    return web.json_response(body)


async def health(request: web.Request) -> web.Response:
    """Liveness: no database, no backend, no key."""
    return web.json_response({"status": "ok"})


async def _database_problem(request: web.Request) -> str | None:
    try:
        await request.app[DATABASE].run(queries.ping)
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


async def ready(request: web.Request) -> web.Response:
    """Readiness: Postgres answers and at least one backend is up."""
    timeout = float(request.app[SETTINGS].connect_timeout_seconds)
    database, backends = await asyncio.gather(
        _database_problem(request), request.app[BACKENDS].probe(timeout)
    )
    # /ready needs no key and the proxy listens on the network: why a part fails (hosts, ports,
    # Postgres' own words) is told to callers on this machine only.
    detailed = request.remote in LOCAL_ADDRESSES
    if database is None:
        checks: dict[str, str] = {"database": "ok"}
    else:
        checks = {"database": database if detailed else "unreachable"}
    for name, problem in backends.items():
        label = "backend" if name == "default" else f"backend {name}"
        reason = f": {problem}" if detailed else ""
        checks[label] = f"not reachable{reason}" if problem else "ok"
    failing = [name for name, state in checks.items() if state != "ok"]
    # One backend up is enough to serve; the others are named but do not fail readiness.
    ready = database is None and any(problem is None for problem in backends.values())
    if not failing:
        status = "ready"
    else:
        status = ("ready, but failing: " if ready else "not ready: ") + ", ".join(failing)
    # Informational: while the listener is down, revocations take up to the cache TTL.
    listening = request.app[AUTH_LISTENER].connected.is_set()
    body = {
        "status": status,
        "checks": checks,
        "auth_notifications": "listening" if listening else "reconnecting",
    }
    return web.json_response(body, status=200 if ready else 503)
