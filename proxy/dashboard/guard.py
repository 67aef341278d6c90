"""Nothing without signing in, and no action without its CSRF token: checked here, in one place,
for every route, so no handler can forget.

- A request without a live session gets the sign-in page (pages), 401 (`/live.json`) or 403
  (actions); so does one whose admin token was revoked since it signed in (asked of Postgres on
  every request: revoking a token ends its sessions at once, on every proxy).
- Every POST must carry its session's CSRF token in the `csrf` form field. The session cookie is
  also `SameSite=Strict`, so another site cannot even send it; the token guards what that misses
  (an old browser, a same-site page of another service on the same host).
- A session a user opened with their own API key reaches `/me` (their usage), `/me/...` (their
  own keys, when allowed) and `/logout`, and nothing else: every admin page and action is a 403.
  It ends as soon as the key stops working (revoked, expired, its user disabled), checked on
  every request like an admin token.
- Sign-in (`/login`) has its own guard (a double-submit token and a rate limit, `signin.py`);
  the static files (a charting library, CSS, JS) are public and hold nothing secret.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.appkeys import DATABASE
from proxy.dashboard.keys import PROXY, SESSION, SESSIONS
from proxy.dashboard.render import error_page, is_dashboard_path, redirect
from proxy.db import accounts, admin_tokens
from proxy.db.connect import DatabaseUnavailable

log = logging.getLogger(__name__)

SESSION_COOKIE = "llama_gate_session"
PUBLIC_PREFIXES = ("/login", "/static/")
USER_PATHS = frozenset({"/me", "/logout"})  # with /me/...: all a user's own session may reach


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    sessions = request.app[SESSIONS]
    cookie = request.cookies.get(SESSION_COOKIE)
    session = sessions.get(cookie)
    if session is not None:
        token_id = session.token_id
        is_user = session.user_id is not None
        try:
            active = await request.app[PROXY][DATABASE].run(
                lambda con: (
                    accounts.key_active(con, token_id)
                    if is_user
                    else admin_tokens.admin_token_active(con, token_id)
                )
            )
        except DatabaseUnavailable as exc:
            return error_page(request, 503, f"{exc}. The dashboard needs Postgres: try again.")
        if not active:
            what = "API key" if is_user else "admin token"
            log.info("dashboard: %s %s no longer works; its sessions end", what, token_id)
            sessions.close_token(token_id)
            session = None
    if session is None:
        return _refuse(request)
    request[SESSION] = session
    if session.user_id is not None and request.path == "/":
        return redirect("/me")
    if (
        session.user_id is not None
        and request.path not in USER_PATHS
        and not request.path.startswith("/me/")
    ):
        # A user signed in with their API key sees their own page, and no admin's.
        return error_page(
            request,
            403,
            f"You are signed in as {session.username} with an API key: this page is for "
            "administrators. Your own usage is at /me.",
        )
    if request.method == "POST":
        form = await request.post()
        sent = form.get("csrf")
        if not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
            log.warning(
                "dashboard: %s %s without its CSRF token refused (admin token %s)",
                request.method,
                request.path,
                session.token_id,
            )
            return error_page(
                request,
                403,
                "This action came without the dashboard's security token, so it was not "
                "carried out. Reload the page and try again.",
            )
    return await handler(request)


def _refuse(request: web.Request) -> web.StreamResponse:
    if request.method == "GET" and request.path != "/live.json":
        back = request.path_qs
        return redirect(
            "/login?" + urlencode({"next": back}) if is_dashboard_path(back) else "/login"
        )
    if request.method == "GET":
        return web.json_response({"error": "sign in first"}, status=401)
    return error_page(request, 403, "Sign in first: this action needs a signed-in admin.")
