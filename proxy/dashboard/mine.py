"""/me: a user's own page, for a session opened with their API key: their requests and tokens per
day (charts), their token quotas today, their keys with last use and scope, and their latest
requests. Only ever their own rows: every query here is filtered by the session's user.

With LLAMA_PROXY_SELF_SERVICE_KEYS=1 they may also make a key (shown once, with their user's full
access) and revoke one of their own keys (`/me/keys`, `/me/keys/{key_id}/revoke`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from proxy.appkeys import DATABASE, SETTINGS
from proxy.auth import issuing
from proxy.dashboard import forms
from proxy.dashboard.keys import PROXY, SESSION
from proxy.dashboard.render import error_page, redirect, render
from proxy.db import accounts, ledger, usage
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.ledger import RequestFilter

log = logging.getLogger(__name__)

DAYS = 30
LATEST = 20
LATEST_COLUMNS = ("created_at", "path", "model", "status_code", "duration_ms", "prompt_tokens",
                  "completion_tokens")  # fmt: skip


async def page(request: web.Request) -> web.StreamResponse:
    session = request[SESSION]
    if session.user_id is None or session.username is None:
        return redirect("/")  # an admin: the whole dashboard is theirs
    username = session.username
    now = datetime.now(UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)

    user_id = session.user_id

    # By user id, never by name: a user deleted and made again under the same name sees only
    # their own rows (audit rows keep the old user's name).
    async def read(con: Connection) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        return (
            await usage.user_usage_daily(con, (now - timedelta(days=DAYS)).date(), user_id),
            await usage.quota_usage(con, day_start, now - timedelta(minutes=1), username),
            await accounts.list_keys(con, username),
            await ledger.request_log(
                con, RequestFilter(user_id=user_id), None, LATEST, LATEST_COLUMNS
            ),
        )

    try:
        daily, quotas, keys, latest = await request.app[PROXY][DATABASE].run(read)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. The dashboard needs Postgres: try again.")
    days = sorted(daily, key=lambda row: row["day"])
    data = {
        "days": [row["day"].isoformat() for row in days],
        "requests": [int(row["requests"]) for row in days],  # the view's sums may be numeric
        "tokens": [int(row["prompt_tokens"] + row["completion_tokens"]) for row in days],
        "errors": [int(row["errors"]) for row in days],
    }
    return render(
        request,
        "mine.html",
        username=username,
        data=data,
        totals={
            "requests": sum(data["requests"]),
            "tokens": sum(data["tokens"]),
            "errors": sum(data["errors"]),
        },
        quota=quotas[0] if quotas else None,
        keys=keys,
        latest=latest,
        days=DAYS,
        self_service=request.app[PROXY][SETTINGS].self_service_keys and not session.scoped,
    )


def _own(request: web.Request) -> tuple[int, str]:
    """The signed-in user's id and name; a 403 unless users may manage their own keys."""
    session = request[SESSION]
    if session.user_id is None or session.username is None:
        raise web.HTTPForbidden(
            text="Only a user signed in with their own API key manages it here."
        )
    if not request.app[PROXY][SETTINGS].self_service_keys:
        raise web.HTTPForbidden(
            text="Your administrator makes and revokes keys here (LLAMA_PROXY_SELF_SERVICE_KEYS)."
        )
    if session.scoped:  # a key of limited access must not mint one without its limits
        raise web.HTTPForbidden(
            text="You signed in with a key limited to some models or APIs, or with limits, a "
            "budget or an expiry of its own: it makes and revokes no keys. Sign in with a key "
            "that has your full access."
        )
    return session.user_id, session.username


async def create_key(request: web.Request) -> web.StreamResponse:
    """A new key of the signed-in user's own, shown once."""
    user_id, username = _own(request)
    label = forms.label(await request.post())
    try:
        key = await request.app[PROXY][DATABASE].run(
            lambda con: issuing.issue_key(con, user_id, label, None)
        )
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. The dashboard needs Postgres: try again.")
    log.info("dashboard: %s made their own key %s", username, key.key_id)
    return render(request, "key.html", username=username, key=key, headline="Your new key")


async def revoke_key(request: web.Request) -> web.StreamResponse:
    """Revoke one of the signed-in user's own keys at once (another's is not found)."""
    user_id, username = _own(request)
    key_id = forms.key_id(request.match_info["key_id"])

    async def work(con: Connection) -> bool:
        owner = await accounts.get_key_owner(con, key_id)
        if owner is None or owner["user_id"] != user_id:
            return False
        return await accounts.revoke_key(con, key_id)

    try:
        revoked = await request.app[PROXY][DATABASE].run(work)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. The dashboard needs Postgres: try again.")
    if not revoked:
        return error_page(request, 404, f"You have no working key {key_id}.")
    log.info("dashboard: %s revoked their own key %s", username, key_id)
    request[SESSION].notices.append(f"Revoked your key {key_id}; it stops working at once.")
    return redirect("/me")
