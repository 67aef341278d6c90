"""Groups: each group's members, budgets with their use now, and tokens per day (a chart).

The same queries as `llama-gate list-groups` and `usage --group`; groups are managed with the CLI.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from proxy.appkeys import DATABASE
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import error_page, render
from proxy.db import limits as limits_sql
from proxy.db.connect import Connection, DatabaseUnavailable

DAYS = 30


async def _read(con: Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    since = (datetime.now(UTC) - timedelta(days=DAYS - 1)).date()
    return await limits_sql.list_groups(con), await limits_sql.groups_daily_tokens(con, since)


def chart_data(daily: list[asyncpg.Record]) -> dict[str, Any]:
    """Tokens per day, one series per group, over the last DAYS days (days without use: 0)."""
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in range(DAYS - 1, -1, -1)]
    series: dict[str, dict[Any, int]] = {}
    for row in daily:
        series.setdefault(row["group_name"], {})[row["day"]] = int(row["tokens"])
    return {
        "days": [day.isoformat() for day in days],
        "groups": [
            {"name": name, "tokens": [by_day.get(day, 0) for day in days]}
            for name, by_day in series.items()
        ],
    }


async def page(request: web.Request) -> web.StreamResponse:
    try:
        groups, daily = await request.app[PROXY][DATABASE].run(_read)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Try again in a moment.")
    return render(
        request,
        "groups.html",
        groups=[{"group": group, "budgets": limits_sql.budgets_now(group)} for group in groups],
        data=chart_data(daily),
        days=DAYS,
    )
