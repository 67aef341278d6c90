"""Users: each user's limits, token quotas with today's use, and keys with their last use.

The same queries as `llama-gate list-users`, `list-keys` and `usage --quotas`. The actions on
this page are in `actions.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from proxy.appkeys import DATABASE, SETTINGS
from proxy.dashboard import forms
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import error_page, render
from proxy.db import accounts, usage
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.settings import Settings


@dataclass(frozen=True)
class Directory:
    users: list[asyncpg.Record]
    keys: list[asyncpg.Record]
    quotas: list[asyncpg.Record]  # users with a token quota: their use today and last minute
    today: list[asyncpg.Record]  # llama_usage_daily for today: requests and tokens per user


async def read_directory(con: Connection) -> Directory:
    now = datetime.now(UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return Directory(
        await accounts.list_users(con),
        await accounts.list_keys(con, None),
        await usage.quota_usage(con, day_start, now - timedelta(minutes=1), None),
        await usage.usage_daily(con, day_start.date(), None),
    )


def defaults(settings: Settings) -> dict[str, str]:
    """What each limit is without an override (shown as the form's placeholders)."""
    return {
        "rate_limit": str(settings.rate_limit),
        "rate_window_seconds": str(settings.rate_window_seconds),
        "max_concurrent": str(settings.max_concurrent),
        "max_tokens": str(settings.max_tokens_hard_cap),
        "tokens_per_day": "no quota",
        "tokens_per_minute": "no quota",
    }


def rows(directory: Directory) -> list[dict[str, Any]]:
    quotas = {row["username"]: row for row in directory.quotas}
    today = {row["username"]: row for row in directory.today}
    keys: dict[str, list[asyncpg.Record]] = {}
    for key in directory.keys:
        keys.setdefault(key["username"], []).append(key)
    shown = []
    for user in directory.users:
        name = user["username"]
        used = today.get(name)
        quota = quotas.get(name)
        tokens = int(used["prompt_tokens"]) + int(used["completion_tokens"]) if used else 0
        shown.append(
            {
                "user": user,
                "keys": keys.get(name, []),
                "requests_today": int(used["requests"]) if used else 0,
                # Next to a quota, the figure the quota goes by: this account's rows. The daily
                # view goes by name, so it also counts a deleted namesake's rows of today.
                "tokens_today": int(quota["tokens_today"]) if quota else tokens,
                "quota": quota,
            }
        )
    return shown


async def page(request: web.Request, error: str = "", status: int = 200) -> web.StreamResponse:
    """Every user with their limits, quotas, keys and the actions on them."""
    try:
        directory = await request.app[PROXY][DATABASE].run(read_directory)
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Try again in a moment.")
    settings = request.app[PROXY][SETTINGS]
    return render(
        request,
        "users.html",
        status=status,
        error=error,
        users=rows(directory),
        limits=forms.LIMITS,
        defaults=defaults(settings),
        expiries=list(forms.EXPIRIES),
        graces=list(forms.GRACES),
    )
