"""/me: a user's own page, for a session opened with their API key: their requests and tokens per
day (charts), their token quotas today, their keys with last use and scope, and their latest
requests. Only ever their own rows: every query here is filtered by the session's user.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from proxy.appkeys import DATABASE
from proxy.dashboard.keys import PROXY, SESSION
from proxy.dashboard.render import error_page, redirect, render
from proxy.db import queries
from proxy.db.connect import DatabaseUnavailable
from proxy.db.queries import Connection, RequestFilter

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

    async def read(con: Connection) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        return (
            await queries.usage_daily(con, (now - timedelta(days=DAYS)).date(), username),
            await queries.quota_usage(con, day_start, now - timedelta(minutes=1), username),
            await queries.list_keys(con, username),
            await queries.request_log(
                con, RequestFilter(username=username), None, LATEST, LATEST_COLUMNS
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
    )
