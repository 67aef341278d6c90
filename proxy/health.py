"""Probes: `/health` says the process is alive; `/ready` that it can serve requests; `/` what
this server is.

None needs a key, and none is recorded as an API request. `/ready` on the public listener answers
from what is already known (the backends' last probes, whether Postgres answered the last query),
as `/` does: it costs nothing, queries nothing, and never changes what a waiting request sees.
Asked from this machine (or on the metrics listener, `readiness_routes`), it looks now and says why:
one trivial query to Postgres and a look at each backend's `/health` that changes no state.
"""

from __future__ import annotations

import asyncio
from importlib import metadata

from aiohttp import web

from proxy.appkeys import AUTH_LISTENER, BACKENDS, DATABASE, SETTINGS
from proxy.db import connect
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


async def _database_problem(request: web.Request, app: web.Application) -> str | None:
    try:
        await app[DATABASE].run(connect.ping)
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


async def ready(request: web.Request) -> web.Response:
    """Readiness: Postgres answers and at least one backend is up."""
    if request.remote in LOCAL_ADDRESSES:
        return await _detailed(request, request.app)
    # From the network: what is known already, and nothing of why (hosts, ports, Postgres'
    # own words are for this machine).
    app = request.app
    backends = app[BACKENDS]
    up = any(backends.is_up(upstream.name) for upstream in backends.upstreams)
    ready = up and app[DATABASE].up
    body = {"status": "ready" if ready else "not ready"}
    return web.json_response(body, status=200 if ready else 503)


def readiness_routes(proxy: web.Application) -> list[web.RouteDef]:
    """`/ready` with its details, for the metrics listener (loopback by default)."""

    async def detailed(request: web.Request) -> web.Response:
        return await _detailed(request, proxy)

    return [web.get("/ready", detailed)]


async def _detailed(request: web.Request, app: web.Application) -> web.Response:
    timeout = float(app[SETTINGS].connect_timeout_seconds)
    database, backends = await asyncio.gather(
        _database_problem(request, app), app[BACKENDS].prober.check(timeout)
    )
    checks: dict[str, str] = {"database": database or "ok"}
    for name, problem in backends.items():
        label = "backend" if name == "default" else f"backend {name}"
        checks[label] = f"not reachable: {problem}" if problem else "ok"
    failing = [name for name, state in checks.items() if state != "ok"]
    # One backend up is enough to serve; the others are named but do not fail readiness.
    ready = database is None and any(problem is None for problem in backends.values())
    if not failing:
        status = "ready"
    else:
        status = ("ready, but failing: " if ready else "not ready: ") + ", ".join(failing)
    # Informational: while the listener is down, revocations take up to the cache TTL.
    listening = app[AUTH_LISTENER].connected.is_set()
    body = {
        "status": status,
        "checks": checks,
        "auth_notifications": "listening" if listening else "reconnecting",
    }
    return web.json_response(body, status=200 if ready else 503)
