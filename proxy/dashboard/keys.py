"""The typed keys of what the dashboard application shares."""

from __future__ import annotations

import jinja2
from aiohttp import web

from proxy.auth.apikeys import KeyHasher
from proxy.dashboard.sessions import Session, Sessions, SignInLimiter

# The proxy application the dashboard shows and acts on (its database, backends, places).
PROXY = web.AppKey("proxy", web.Application)
SESSIONS = web.AppKey("sessions", Sessions)
SIGN_INS = web.AppKey("sign_ins", SignInLimiter)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
HASHER = web.AppKey("hasher", KeyHasher)
# The signed-in session of a request, set by the guard.
SESSION = web.RequestKey("session", Session)
