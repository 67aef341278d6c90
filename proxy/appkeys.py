"""The typed keys of everything the proxy application shares (see `proxy.app.create_app`).

They live apart from `app.py` so handlers can import them without importing the factory that
imports the handlers.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.audit.row import CompletionHook
from proxy.audit.strangers import Strangers
from proxy.audit.writer import AuditWriter
from proxy.auth.authenticator import Authenticator
from proxy.auth.listener import AuthListener
from proxy.cluster.presence import Presence
from proxy.cluster.slots import SharedSlots
from proxy.db.pool import Database
from proxy.limits.admission import Admission
from proxy.limits.quotas import TokenQuotas
from proxy.limits.ratelimit import RateLimiter
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.tools import Tool
from proxy.upstream.backends import Backends

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
AUTH_LISTENER = web.AppKey("auth_listener", AuthListener)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
QUOTAS = web.AppKey("quotas", TokenQuotas)
ADMISSION = web.AppKey("admission", Admission)
BACKENDS = web.AppKey("backends", Backends)
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
# Each finished request's row goes to every hook: the audit writer, metrics, quotas (and tests).
COMPLETION_HOOKS = web.AppKey[list[CompletionHook]]("completion_hooks")
AUDIT_WRITER = web.AppKey("audit_writer", AuditWriter)
STRANGERS = web.AppKey("strangers", Strangers)  # requests without a valid key, in aggregate
METRICS = web.AppKey("metrics", Metrics)
PRESENCE = web.AppKey("presence", Presence)  # this process's row of llama_proxies, and its peers
SHARED_SLOTS = web.AppKey("shared_slots", SharedSlots)  # backend slots shared with its peers
# The tools this deployment declares (LLAMA_PROXY_TOOLS_FILE), read at startup.
DECLARED_TOOLS = web.AppKey[tuple[Tool, ...]]("declared_tools")
