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

from proxy import health
from proxy.appkeys import (
    ADMISSION,
    AUDIT_WRITER,
    AUTH_LISTENER,
    AUTHENTICATOR,
    BACKENDS,
    COMPLETION_HOOKS,
    DATABASE,
    DECLARED_TOOLS,
    METRICS,
    PRESENCE,
    QUOTAS,
    RATE_LIMITER,
    SETTINGS,
    SHARED_SLOTS,
    STRANGERS,
    UPSTREAM_SESSION,
)
from proxy.audit.row import AuditRow, CompletionHook
from proxy.audit.strangers import Strangers
from proxy.audit.writer import AuditWriter
from proxy.auth.authenticator import Authenticator
from proxy.auth.listener import AuthListener
from proxy.background import background
from proxy.cluster.presence import Presence, local_figures, new_id
from proxy.cluster.slots import SharedSlots
from proxy.dashboard.app import dashboard_site
from proxy.db.cluster import SLOTS_CHANNEL
from proxy.db.limits import GROUPS_CHANNEL
from proxy.db.pool import Database
from proxy.dialects.openai import DIALECT as OPENAI
from proxy.edge.cors import Cors
from proxy.forwarded import TrustedProxies
from proxy.limits.admission import Admission
from proxy.limits.budgets import Budgets
from proxy.limits.places import Places
from proxy.limits.prompts import Prompts
from proxy.limits.quotas import TokenQuotas
from proxy.limits.ratelimit import RateLimiter
from proxy.metrics import Metrics, metrics_app
from proxy.pipeline.handler import add_fallback, add_routes, ledger
from proxy.routes import build_routes
from proxy.settings import Settings
from proxy.tools import load_tools
from proxy.upstream.backends import Backends

# llama_cpp.server (uvicorn) closes idle keep-alive connections after 5 s; reusing one just as it
# closes fails the request, so the proxy lets its own idle connections go sooner.
UPSTREAM_KEEPALIVE_SECONDS = 4.0
# How long the final audit flush may wait for Postgres before the rest goes to a spill file.
AUDIT_FLUSH_SECONDS = 10.0


def create_app(settings: Settings) -> web.Application:
    """The proxy for `settings`; `SettingsError` when a file they name cannot be used."""
    declared_tools = load_tools(settings)
    routes = build_routes(settings)
    metrics = Metrics(route.path for route in routes)
    database = Database(settings)
    audit_writer = AuditWriter(
        lambda: database.pool,
        settings.runtime_dir / "audit-spill",
        journal=settings.audit_journal,
        memory_rows=settings.audit_memory_rows,
    )
    metrics.watch_audit(audit_writer)
    quotas = TokenQuotas(database)
    budgets = Budgets(database, lambda: app[BACKENDS].default_model())
    rate_limiter = RateLimiter(settings, database)
    strangers = Strangers(database)

    def ledger_row(row: AuditRow) -> None:
        """A caller's request is a row of the ledger; one without a valid key is counted."""
        if row.user_id is None:
            strangers.observe(row)
        else:
            audit_writer.submit(row)

    # quotas.observe counts a request's tokens before its audit row lands.
    hooks: list[CompletionHook] = [ledger_row, metrics.observe, quotas.observe, budgets.observe]
    app = web.Application(client_max_size=settings.max_body_bytes)
    table = add_routes(app, routes)
    if settings.trusted_proxies:  # first: everything after it sees the client's address
        app.middlewares.append(TrustedProxies(settings.trusted_proxies).middleware)
    cors = Cors(settings.cors_origins)
    app.middlewares.extend(
        [cors.preflight, metrics.middleware(health.PATHS), ledger(table, health.PATHS, OPENAI)]
    )
    app.on_response_prepare.append(cors.label)
    authenticator = Authenticator(settings, database)
    app[SETTINGS] = settings
    app[DECLARED_TOOLS] = declared_tools
    app[COMPLETION_HOOKS] = hooks
    app[AUDIT_WRITER] = audit_writer
    app[STRANGERS] = strangers
    app[METRICS] = metrics
    app[DATABASE] = database
    app[AUTHENTICATOR] = authenticator
    app[AUTH_LISTENER] = AuthListener(
        settings, authenticator.invalidate, authenticator.invalidate_all
    )
    app[RATE_LIMITER] = rate_limiter
    app[QUOTAS] = quotas
    prompts = Prompts(settings, lambda: app[BACKENDS], lambda: app[UPSTREAM_SESSION])
    app[ADMISSION] = Admission(settings, Places(), quotas, budgets, rate_limiter, prompts)
    app[AUTH_LISTENER].also(GROUPS_CHANNEL, budgets.heard)
    backends = app[BACKENDS] = Backends.from_settings(settings)
    proxy_id = new_id()
    shared = app[SHARED_SLOTS] = SharedSlots(
        database,
        proxy_id,
        backends.slot_counts,
        backends.lone_in_flight,
        backends.requeue,
        forced=settings.workers > 1,
    )
    backends.shared = shared
    app[AUTH_LISTENER].also(SLOTS_CHANNEL, shared.heard)
    app[PRESENCE] = Presence(
        database,
        lambda: local_figures(app[BACKENDS], app[ADMISSION].places.by_user()),
        shared,
        proxy_id,
    )
    # Cleaned up in reverse: metrics and the audit flush go first, while the pool is still open.
    app.cleanup_ctx.extend(
        (
            _database,
            _rate_leases,
            _upstream_session,
            _authenticator,
            _auth_listener,
            _audit,
            _strangers,
            _presence,
            _budgets,
            _metrics_site,
        )
    )
    app.cleanup_ctx.append(_backend_probes)
    app.cleanup_ctx.append(dashboard_site)  # its own listener; stops first, the pool still open
    health.add_routes(app)
    add_fallback(app, table)  # last: it matches every path
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    await app[DATABASE].open()
    yield
    await app[DATABASE].close()


async def _rate_leases(app: web.Application) -> AsyncIterator[None]:
    """At a stop, give back the rate limits' leases while the pool is still open."""
    yield
    await app[RATE_LIMITER].close()


async def _backend_probes(app: web.Application) -> AsyncIterator[None]:
    """Probe the backends' health for the app's whole life (a replaced BACKENDS included)."""
    async with app[BACKENDS].prober.running():
        yield


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
    async with background(app[AUTH_LISTENER].run()):
        yield


async def _audit(app: web.Application) -> AsyncIterator[None]:
    """Write audit rows for the app's whole life; on the way out, flush every last one."""
    writer = app[AUDIT_WRITER]
    task = asyncio.create_task(writer.run(shutdown_timeout=AUDIT_FLUSH_SECONDS))
    yield
    writer.stop()
    await task


async def _presence(app: web.Application) -> AsyncIterator[None]:
    """This process's row of llama_proxies, refreshed for the app's whole life, then deleted;
    and its shared slots' leases, renewed meanwhile, then given back."""
    async with app[SHARED_SLOTS].running(), app[PRESENCE].beating():
        yield


async def _budgets(app: web.Application) -> AsyncIterator[None]:
    """Groups and weights read before the first request; charges settled for the app's life."""
    async with app[ADMISSION].budgets.running():
        yield


async def _strangers(app: web.Application) -> AsyncIterator[None]:
    """Count the requests without a valid key for the app's whole life; flush them at the end."""
    async with background(app[STRANGERS].run()):
        yield


async def _metrics_site(app: web.Application) -> AsyncIterator[None]:
    """Serve /metrics on its own (loopback by default) listener; port 0 means no metrics."""
    settings = app[SETTINGS]
    if settings.metrics_port == 0:
        yield
        return
    served = metrics_app(app[METRICS], health.readiness_routes(app))
    runner = web.AppRunner(served, access_log=None)
    await runner.setup()
    try:
        # reuse_port: a successor (`console.sh restart`) binds it while this one still serves.
        await web.TCPSite(
            runner, settings.metrics_host, settings.metrics_port, reuse_port=True
        ).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            exc.errno,
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
            f"({exc.strerror}); set LLAMA_PROXY_METRICS_PORT to a free port, or 0 for none",
        ) from None
    yield
    await runner.cleanup()
