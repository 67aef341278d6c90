"""Signing in with an admin token (the whole dashboard) or a user's own API key (their usage page
at /me, nothing else), and out again.

The sign-in form carries a double-submit token (a random value both in a `SameSite=Strict`
cookie and in the form), so no other site can sign a browser in to an account of its choosing.
Attempts are rate limited before anything is looked up (`sessions.SignInLimiter`), and every
failure gets the same answer, whatever the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets

from aiohttp import web

from proxy.appkeys import DATABASE
from proxy.auth.admintokens import parse_admin_token
from proxy.auth.apikeys import parse_key
from proxy.dashboard.guard import SESSION_COOKIE
from proxy.dashboard.keys import HASHER, PROXY, SESSIONS, SIGN_INS
from proxy.dashboard.render import error_page, is_dashboard_path, redirect, render
from proxy.db import accounts, admin_tokens
from proxy.db.connect import DatabaseUnavailable

log = logging.getLogger(__name__)

SIGN_IN_COOKIE = "llama_gate_sign_in"
SIGN_IN_COOKIE_SECONDS = 3600
MAX_TOKEN_CHARS = 200
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _next(raw: object) -> str:
    """Where to go after signing in: a path of this dashboard only (no open redirect), or `/`
    when none is given; anything else is a 400."""
    if raw is None or raw == "":
        return "/"
    if isinstance(raw, str) and is_dashboard_path(raw):
        return raw
    raise web.HTTPBadRequest(
        text="'next' must be a path of this dashboard, such as /users.",
        headers={"Cache-Control": "no-store"},
    )


def _cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
        max_age=SIGN_IN_COOKIE_SECONDS if name == SIGN_IN_COOKIE else None,
    )


def _form(request: web.Request, status: int = 200, error: str = "", nxt: str = "/") -> web.Response:
    # One nonce per browser, not per page view: a second tab (or the browser fetching an icon
    # that lands here) must not void the form already open.
    nonce = request.cookies.get(SIGN_IN_COOKIE, "")
    if not _NONCE_RE.match(nonce):
        nonce = secrets.token_urlsafe(32)
    response = render(request, "login.html", status=status, error=error, nonce=nonce, next=nxt)
    _cookie(response, request, SIGN_IN_COOKIE, nonce)
    return response


async def page(request: web.Request) -> web.StreamResponse:
    """The sign-in form."""
    nxt = _next(request.query.get("next"))
    session = request.app[SESSIONS].get(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        return redirect("/me" if session.user_id is not None else nxt)
    return _form(request, nxt=nxt)


async def sign_in(request: web.Request) -> web.StreamResponse:
    """Check the admin token; on success open a session and go where the admin was headed."""
    form = await request.post()
    nxt = _next(form.get("next"))
    nonce, sent = request.cookies.get(SIGN_IN_COOKIE), form.get("csrf")
    if not nonce or not isinstance(sent, str) or not hmac.compare_digest(nonce, sent):
        return _form(request, 403, "The sign-in form had expired. Paste the token again.", nxt)
    wait = request.app[SIGN_INS].attempt(request.remote or "unknown")
    if wait:
        log.warning("dashboard: sign-in attempts from %s are over the limit", request.remote)
        message = f"Too many sign-in attempts. Try again in {wait} s."
        response = _form(request, 429, message, nxt)
        response.headers["Retry-After"] = str(wait)
        return response
    token = form.get("token")
    presented = token.strip() if isinstance(token, str) and len(token) <= MAX_TOKEN_CHARS else ""
    try:
        if parse_key(presented) is not None:  # a user's API key: their own page
            return await _user_sign_in(request, presented)
        token_id = await _verify(request, presented)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Signing in needs Postgres: try again.")
    if token_id is None:
        log.info("dashboard: a sign-in from %s with a wrong admin token", request.remote)
        return _form(
            request,
            401,
            "That is not a valid admin token (or it was revoked). Make one with "
            "`llama-gate create-admin-token` and paste all of it; or paste your own API key "
            "to see your usage.",
            nxt,
        )
    cookie, _session = request.app[SESSIONS].open(token_id)
    log.info("dashboard: signed in with admin token %s from %s", token_id, request.remote)
    response = redirect(nxt)
    _cookie(response, request, SESSION_COOKIE, cookie)
    response.del_cookie(SIGN_IN_COOKIE, path="/")
    return response


async def _user_sign_in(request: web.Request, presented: str) -> web.StreamResponse:
    """A user signs in with their API key: a session that sees their own usage page only."""
    record = await _verify_key(request, presented)
    if record is None:
        log.info("dashboard: a sign-in from %s with a wrong API key", request.remote)
        return _form(
            request,
            401,
            "That API key does not work (wrong, revoked or expired, or its user is disabled).",
            "/me",
        )
    sessions = request.app[SESSIONS]
    cookie, _session = sessions.open(
        record.key_id, record.user_id, record.username, record.restricted
    )
    log.info("dashboard: %s signed in with key %s from %s", record.username, record.key_id,
             request.remote)  # fmt: skip
    response = redirect("/me")
    _cookie(response, request, SESSION_COOKIE, cookie)
    response.del_cookie(SIGN_IN_COOKIE, path="/")
    return response


async def _verify_key(request: web.Request, presented: str) -> accounts.KeyRecord | None:
    """The record of a working API key (right secret, not revoked or expired, user enabled)."""
    parts = parse_key(presented)
    if parts is None:
        return None
    key_id, secret = parts
    database = request.app[PROXY][DATABASE]
    record = await database.run(lambda con: accounts.lookup_key(con, key_id))
    if record is None or not await database.run(lambda con: accounts.key_active(con, key_id)):
        return None
    # argon2 off the event loop: the proxy keeps serving API requests meanwhile.
    if not await asyncio.to_thread(request.app[HASHER].verify, record.secret_hash, secret):
        return None
    return record


async def _verify(request: web.Request, presented: str) -> str | None:
    """The token id of a valid, unrevoked admin token; None for anything else."""
    parts = parse_admin_token(presented)
    if parts is None:
        return None
    token_id, secret = parts
    database = request.app[PROXY][DATABASE]
    row = await database.run(lambda con: admin_tokens.lookup_admin_token(con, token_id))
    if row is None:
        return None
    # argon2 off the event loop: the proxy keeps serving API requests meanwhile.
    if not await asyncio.to_thread(request.app[HASHER].verify, row["secret_hash"], secret):
        return None
    await database.run(lambda con: admin_tokens.touch_admin_token(con, token_id))
    return token_id


async def sign_out(request: web.Request) -> web.StreamResponse:
    """End this session (the guard checked its CSRF token)."""
    request.app[SESSIONS].close(request.cookies.get(SESSION_COOKIE))
    response = redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
