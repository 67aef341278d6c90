"""Overview: the last 30 days, per UTC day, from the same queries as `llama-gate usage`.

Requests and tokens come from `llama_usage_daily` per user (`proxy.db.usage.usage_daily`),
stacked by user in the charts (the heaviest users by name, the rest together); errors, latency
and time to first byte, and the share of prompt tokens served from the backend's prompt cache,
from `proxy.db.usage.usage_daily_totals`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from proxy.appkeys import DATABASE
from proxy.dashboard.keys import PROXY
from proxy.dashboard.render import error_page, render
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.usage import usage_daily, usage_daily_totals

DAYS = 30
STACKED_USERS = 8  # named in the stacked charts; the others are summed as one
TOP_USERS = 10
NO_USER = "(no key)"  # rows without a username: requests that failed authentication


@dataclass(frozen=True)
class Usage:
    days: list[date]
    per_user: list[asyncpg.Record]  # usage_daily
    totals: list[dict[str, Any]]  # usage_daily_totals


async def read_usage(con: Connection, today: date) -> Usage:
    since = today - timedelta(days=DAYS - 1)
    per_user = await usage_daily(con, since, None)
    totals = await usage_daily_totals(con, since)
    return Usage([since + timedelta(days=i) for i in range(DAYS)], per_user, totals)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)  # the percentiles are numeric


def _share(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


def _per_user(usage: Usage, index: dict[date, int]) -> list[dict[str, Any]]:
    """Each user's requests and tokens per day, and totals; the heaviest users first."""
    users: dict[str, dict[str, Any]] = {}
    for row in usage.per_user:
        i = index.get(row["day"])
        if i is None:
            continue
        name = row["username"] or NO_USER
        user = users.setdefault(name, {"name": name, "requests": [0] * DAYS,
                                       "tokens": [0] * DAYS, "errors": 0})  # fmt: skip
        user["requests"][i] += int(row["requests"])
        user["tokens"][i] += int(row["prompt_tokens"]) + int(row["completion_tokens"])
        user["errors"] += int(row["errors"])
    for user in users.values():
        user["total_requests"] = sum(user["requests"])
        user["total_tokens"] = sum(user["tokens"])
    return sorted(users.values(), key=lambda u: (-u["total_tokens"], -u["total_requests"]))


def _stacked(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The heaviest users by name, and the rest summed as one."""
    named = [{k: u[k] for k in ("name", "requests", "tokens")} for u in ranked[:STACKED_USERS]]
    rest = ranked[STACKED_USERS:]
    if rest:
        named.append(
            {
                "name": f"{len(rest)} others",
                "requests": [sum(u["requests"][i] for u in rest) for i in range(DAYS)],
                "tokens": [sum(u["tokens"][i] for u in rest) for i in range(DAYS)],
            }
        )
    return named


def _series(usage: Usage, index: dict[date, int]) -> dict[str, list[Any]]:
    """Everyone's figures per day: counts are 0 on a quiet day, percentiles and shares None."""
    counts = ("requests", "errors", "tokens")
    ratios = ("p50_ms", "p95_ms", "ttfb_p50_ms", "ttfb_p95_ms")
    series: dict[str, list[Any]] = {name: [0] * DAYS for name in counts}
    series.update({name: [None] * DAYS for name in (*ratios, "cached_share")})
    for row in usage.totals:
        i = index.get(row["day"])
        if i is None:
            continue
        series["requests"][i] = int(row["requests"])
        series["errors"][i] = int(row["errors"])
        series["tokens"][i] = int(row["prompt_tokens"]) + int(row["completion_tokens"])
        for name in ratios:
            series[name][i] = _float(row[name])
        series["cached_share"][i] = _share(int(row["cached_tokens"]), int(row["prompt_tokens"]))
    return series


def chart_data(usage: Usage) -> dict[str, Any]:
    """What the charts draw (one value per day, oldest first) and the tables list."""
    index = {day: i for i, day in enumerate(usage.days)}
    ranked = _per_user(usage, index)
    series = _series(usage, index)
    requests, errors = sum(series["requests"]), sum(series["errors"])
    in_range = [row for row in usage.totals if row["day"] in index]
    prompt = sum(int(row["prompt_tokens"]) for row in in_range)
    cached_share = _share(sum(int(row["cached_tokens"]) for row in in_range), prompt)
    return {
        "days": [day.isoformat() for day in usage.days],
        "stacked": _stacked(ranked),
        "series": series,
        "summary": {
            "requests": requests,
            "tokens": sum(series["tokens"]),
            "errors": errors,
            "error_share": _share(errors, requests) or 0.0,
            "users": sum(1 for u in ranked if u["name"] != NO_USER),
            "cached_share": cached_share,
        },
        "top": [
            {k: u[k] for k in ("name", "total_requests", "total_tokens", "errors")}
            for u in ranked[:TOP_USERS]
        ],
    }


async def page(request: web.Request) -> web.StreamResponse:
    """The last 30 days at a glance."""
    today = datetime.now(UTC).date()
    try:
        usage = await request.app[PROXY][DATABASE].run(lambda con: read_usage(con, today))
    except DatabaseUnavailable as exc:
        return error_page(request, 503, f"{exc}. Try again in a moment.")
    data = chart_data(usage)
    return render(request, "overview.html", data=data, first=usage.days[0], last=usage.days[-1])
