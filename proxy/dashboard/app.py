"""The dashboard application, and its own listener in the proxy's life (`dashboard_site`)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy.appkeys import SETTINGS
from proxy.auth.apikeys import KeyHasher
from proxy.dashboard import actions, groups, live, mine, overview, requestlog, signin, users
from proxy.dashboard.guard import guard
from proxy.dashboard.keys import HASHER, PROXY, SESSIONS, SIGN_INS, TEMPLATES
from proxy.dashboard.render import page_defaults, templates
from proxy.dashboard.sessions import Sessions, SignInLimiter

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
FORM_MAX_BYTES = 64 * 1024  # the largest form is a user's limits: a few hundred bytes


def dashboard_app(proxy: web.Application) -> web.Application:
    """The dashboard of the proxy application `proxy` (its database, backends and places)."""
    app = web.Application(client_max_size=FORM_MAX_BYTES, middlewares=[page_defaults, guard])
    app[PROXY] = proxy
    app[SESSIONS] = Sessions()
    app[SIGN_INS] = SignInLimiter()
    app[TEMPLATES] = templates()
    app[HASHER] = KeyHasher()
    router = app.router
    router.add_get("/login", signin.page)
    router.add_post("/login", signin.sign_in)
    router.add_post("/logout", signin.sign_out)
    router.add_get("/", overview.page)
    router.add_get("/live", live.page)
    router.add_get("/live.json", live.snapshot_json)
    router.add_get("/users", users.page)
    router.add_post("/users", actions.create_user)
    router.add_post("/users/{username}/disable", actions.disable_user)
    router.add_post("/users/{username}/enable", actions.enable_user)
    router.add_post("/users/{username}/keys", actions.create_key)
    router.add_post("/users/{username}/limits", actions.set_limits)
    router.add_post("/keys/{key_id}/revoke", actions.revoke_key)
    router.add_post("/keys/{key_id}/rotate", actions.rotate_key)
    router.add_get("/groups", groups.page)
    router.add_get("/requests", requestlog.page)
    router.add_get("/me", mine.page)  # a user's own, signed in with their API key
    router.add_post("/me/keys", mine.create_key)
    router.add_post("/me/keys/{key_id}/revoke", mine.revoke_key)
    router.add_get("/requests.csv", requestlog.export)
    router.add_static("/static", STATIC)
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def dashboard_site(app: web.Application) -> AsyncIterator[None]:
    """Serve the dashboard on its own (loopback by default) listener; port 0 means none."""
    settings = app[SETTINGS]
    host, port = settings.dashboard_host, settings.dashboard_port
    if port == 0:
        yield
        return
    runner = web.AppRunner(dashboard_app(app), access_log=None)
    await runner.setup()
    try:
        # reuse_port: a successor (`console.sh restart`) binds it while this one still serves
        # (only a process of the same user may: Linux's rule for SO_REUSEPORT).
        await web.TCPSite(runner, host, port, reuse_port=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            exc.errno,
            f"cannot serve the dashboard on {host}:{port} ({exc.strerror}); set "
            "LLAMA_PROXY_DASHBOARD_PORT to a free port, or 0 for none",
        ) from None
    if not _loopback(host):
        log.warning(
            "the dashboard listens on %s:%d, reachable from other machines over plain HTTP; "
            "prefer LLAMA_PROXY_DASHBOARD_HOST=127.0.0.1 and an SSH tunnel (see README)",
            host,
            port,
        )
    yield
    await runner.cleanup()
