"""The proxy application: `create_app(settings)` builds it; `llama-gate serve` runs it.

Run it with `handler_cancellation=True` (as `serve` and aiohttp's TestServer do): aiohttp then
cancels a handler whose client disconnected, and that is what closes the backend request and
stops llama_cpp.server generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy import api, errors, health, records
from proxy.appkeys import (
    AUTH_LISTENER,
    AUTHENTICATOR,
    BACKENDS,
    COMPLETION_HOOKS,
    DATABASE,
    RATE_LIMITER,
    SETTINGS,
    UPSTREAM_SESSION,
)
from proxy.auth import Authenticator
from proxy.auth_listener import AuthListener
from proxy.pool import Database
from proxy.ratelimit import RateLimiter
from proxy.records import CompletionHook
from proxy.settings import Settings
from proxy.upstream import Backends

# llama_cpp.server (uvicorn) closes idle keep-alive connections after 5 s; reusing one just as it
# closes fails the request, so the proxy lets its own idle connections go sooner.
UPSTREAM_KEEPALIVE_SECONDS = 4.0


def create_app(settings: Settings) -> web.Application:
    hooks: list[CompletionHook] = []
    app = web.Application(
        middlewares=[records.middleware(hooks, health.PATHS), errors.middleware],
        client_max_size=settings.max_body_bytes,
    )
    database = Database(settings)
    authenticator = Authenticator(settings, database)
    app[SETTINGS] = settings
    app[COMPLETION_HOOKS] = hooks
    app[DATABASE] = database
    app[AUTHENTICATOR] = authenticator
    app[AUTH_LISTENER] = AuthListener(
        settings, authenticator.invalidate, authenticator.invalidate_all
    )
    app[RATE_LIMITER] = RateLimiter(settings, database)
    app[BACKENDS] = Backends.from_settings(settings)
    app.cleanup_ctx.extend((_database, _upstream_session, _authenticator, _auth_listener))
    health.add_routes(app)
    api.add_routes(app)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    await app[DATABASE].open()
    yield
    await app[DATABASE].close()


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS)
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout_seconds,
        sock_read=settings.upstream_timeout_seconds,
    )
    # auto_decompress off: bytes pass through exactly as the backend sent them.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to clients, not to the proxy
    ) as session:
        app[UPSTREAM_SESSION] = session
        yield


async def _authenticator(app: web.Application) -> AsyncIterator[None]:
    authenticator = app[AUTHENTICATOR]
    writer = asyncio.create_task(authenticator.write_last_used_forever())
    yield
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await authenticator.flush_last_used()
    await authenticator.close()


async def _auth_listener(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[AUTH_LISTENER].run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
