"""Pages from templates, and what every dashboard answer carries: security headers, error pages.

Templates are Jinja2 with autoescaping on, so whatever a client put in a path, a model name or an
error text shows as text. No page has inline script or style: the Content-Security-Policy allows
only the dashboard's own files, so an injected `<script>` would not run even if it got through.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.appkeys import SETTINGS
from proxy.dashboard.keys import PROXY, SESSION, TEMPLATES

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
# Pages show keys once, users and the audit log: none of it belongs in a cache.
NO_STORE = {"Cache-Control": "no-store"}
NAV = (
    ("/", "Overview"),
    ("/live", "Live"),
    ("/users", "Users"),
    ("/groups", "Groups"),
    ("/requests", "Requests"),
)
USER_NAV = (("/me", "My usage"),)  # a user signed in with their own API key


def _utc(value: datetime | None) -> str:
    """A timestamp as the dashboard shows it: UTC, to the second."""
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _number(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("proxy.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the test, not the admin
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = _utc
    env.filters["number"] = _number
    return env


def render(
    request: web.Request,
    template: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> web.Response:
    """The page `template` with `context`, plus what every page needs (nav, session, notices)."""
    session = request.get(SESSION)
    settings = request.app[PROXY][SETTINGS]
    page = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            nav=USER_NAV if session is not None and session.user_id is not None else NAV,
            path=request.path,
            session=session,
            csrf=session.csrf if session is not None else "",
            notices=session.take_notices() if session is not None else [],
            api_port=settings.proxy_port,
            **context,
        )
    )
    return web.Response(
        text=page, status=status, content_type="text/html", headers={**NO_STORE, **(headers or {})}
    )


# A path of this dashboard: one leading slash, then no backslash, whitespace or control
# character anywhere (browsers drop tabs and newlines, and read "\\" as "/": "/\t/host" and
# "/\\host" are other sites), and no "//" before its query.
_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\\\x00-\x20\x7f]*$")


def is_dashboard_path(location: str) -> bool:
    """Whether `location` can only lead to a page of this dashboard (no open redirect)."""
    return bool(_LOCAL_PATH.match(location)) and "//" not in location.split("?", 1)[0]


def redirect(location: str) -> web.Response:
    """See other: after an action, the page to show (so a reload does not repeat the action)."""
    return web.Response(status=303, headers={"Location": location, **NO_STORE})


def error_page(request: web.Request, status: int, message: str, **headers: str) -> web.Response:
    return render(request, "error.html", status=status, headers=headers, message=message)


@web.middleware
async def page_defaults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; an error is a page that says what to do, never a trace."""
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        response = error_page(request, 404, "There is no such page in the dashboard.")
    except web.HTTPMethodNotAllowed:
        response = error_page(request, 405, "That page cannot be used this way.")
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(SECURITY_HEADERS)
            raise
        response = error_page(request, exc.status, exc.text or exc.reason)
    except Exception:
        log.exception("dashboard: %s %s failed", request.method, request.path)
        response = error_page(request, 500, "Something went wrong; the proxy's log says what.")
    response.headers.update(SECURITY_HEADERS)
    return response
