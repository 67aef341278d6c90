"""Probes: `/health` says the process is alive; `/ready` that it can serve requests.

Neither needs a key, and neither is recorded as an API request. `/ready` checks Postgres with
one trivial query and each backend with a bare TCP connection (see `Upstream.probe`), and
answers 503 naming what failed.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy import store
from proxy.appkeys import AUTH_LISTENER, BACKENDS, DATABASE, SETTINGS
from proxy.db import DatabaseUnavailable

PATHS = frozenset({"/health", "/ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)


async def health(request: web.Request) -> web.Response:
    """Liveness: no database, no backend, no key."""
    return web.json_response({"status": "ok"})


async def _database_problem(request: web.Request) -> str | None:
    try:
        await request.app[DATABASE].run(store.ping)
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


async def ready(request: web.Request) -> web.Response:
    """Readiness: Postgres answers and every backend accepts connections."""
    timeout = float(request.app[SETTINGS].connect_timeout_seconds)
    database, backends = await asyncio.gather(
        _database_problem(request), request.app[BACKENDS].probe(timeout)
    )
    checks: dict[str, str] = {"database": database or "ok"}
    for name, problem in backends.items():
        label = "backend" if name == "default" else f"backend {name}"
        checks[label] = f"not reachable: {problem}" if problem else "ok"
    failing = [name for name, state in checks.items() if state != "ok"]
    # Informational: while the listener is down, revocations take up to the cache TTL.
    listening = request.app[AUTH_LISTENER].connected.is_set()
    body = {
        "status": "not ready: " + ", ".join(failing) if failing else "ready",
        "checks": checks,
        "auth_notifications": "listening" if listening else "reconnecting",
    }
    return web.json_response(body, status=503 if failing else 200)
