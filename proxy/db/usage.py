"""Tokens and requests used, from the ledger: what quotas count, and the usage reports that
`llama-gate usage` and the dashboard's Overview show."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from proxy.db.connect import Connection


@dataclass(frozen=True)
class TokenTotals:
    """A user's tokens in `llama_requests`: since the day began and within the last minute."""

    day: int
    minute: int
    minute_oldest: datetime | None  # when the oldest tokens counted in the minute were used
    seen: frozenset[str]  # which of the request ids asked about have rows


# Tokens as quotas count them: times the model's weight (migration 0018), rounded up.
_TOKENS = (
    "ceil((coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))"
    " * coalesce(weight, 1))::bigint"
)


async def user_tokens(
    con: Connection,
    user_id: int,
    day_start: datetime,
    minute_start: datetime,
    request_ids: Sequence[str],
    requests_since: datetime,
) -> TokenTotals:
    """One user's tokens since `day_start` and after `minute_start` (one index range scan),
    and which of `request_ids` (requests begun since `requests_since`) have their rows yet."""
    row = await con.fetchrow(
        f"""SELECT t.day, t.minute, t.minute_oldest, s.seen
            FROM (SELECT coalesce(sum({_TOKENS}) FILTER (WHERE created_at >= $2), 0) AS day,
                         coalesce(sum({_TOKENS}) FILTER (WHERE created_at > $3), 0) AS minute,
                         min(created_at) FILTER (WHERE created_at > $3 AND {_TOKENS} > 0)
                             AS minute_oldest
                  FROM llama_requests
                  WHERE user_id = $1
                    AND created_at >= least($2::timestamptz, $3::timestamptz)) AS t,
                 (SELECT coalesce(array_agg(request_id), '{{}}') AS seen
                  FROM llama_requests
                  WHERE user_id = $1 AND created_at >= $5 AND request_id = ANY($4::text[])) AS s""",
        user_id,
        day_start,
        minute_start,
        list(request_ids),
        requests_since,
    )
    assert row is not None
    return TokenTotals(int(row["day"]), int(row["minute"]), row["minute_oldest"],
                       frozenset(row["seen"]))  # fmt: skip


async def quota_usage(
    con: Connection, day_start: datetime, minute_start: datetime, username: str | None
) -> list[asyncpg.Record]:
    """Users with a token quota (or just `username`) and their tokens today and last minute."""
    return await con.fetch(
        f"""SELECT u.username, u.tokens_per_day,
                   coalesce(sum({_TOKENS}) FILTER (WHERE r.created_at >= $1), 0) AS tokens_today,
                   u.tokens_per_minute,
                   coalesce(sum({_TOKENS}) FILTER (WHERE r.created_at > $2), 0)
                       AS tokens_last_minute
            FROM users u
            LEFT JOIN llama_requests r
                   ON r.user_id = u.id
                  AND r.created_at >= least($1::timestamptz, $2::timestamptz)
            WHERE ($3::text IS NULL AND (u.tokens_per_day IS NOT NULL
                                         OR u.tokens_per_minute IS NOT NULL))
               OR u.username = $3
            GROUP BY u.id ORDER BY u.username""",
        day_start,
        minute_start,
        username,
    )


async def usage_daily(con: Connection, since: date, username: str | None) -> list[asyncpg.Record]:
    return await con.fetch(
        """SELECT day, username, requests, errors, prompt_tokens, completion_tokens,
                  bytes_in, bytes_out, p50_ms, p95_ms
           FROM llama_usage_daily
           WHERE day >= $1 AND ($2::text IS NULL OR username = $2)
           ORDER BY day DESC, username NULLS LAST""",
        since,
        username,
    )


async def user_usage_daily(con: Connection, since: date, user_id: int) -> list[asyncpg.Record]:
    """One user's days, as `usage_daily` shows them, of their own rows (by id, not by name)."""
    return await con.fetch(
        f"""SELECT {_USAGE_DAY} AS day, username, count(*) AS requests,
                   count(*) FILTER (WHERE status_code >= 400) AS errors,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(request_bytes), 0) AS bytes_in,
                   coalesce(sum(response_bytes), 0) AS bytes_out,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p95_ms
            FROM llama_requests
            WHERE user_id = $2 AND created_at >= $1::date::timestamp AT TIME ZONE 'UTC'
            GROUP BY 1, 2 ORDER BY 1 DESC, 2""",
        since,
        user_id,
    )


# -- usage reports: `llama-gate usage` and the dashboard's Overview run the same queries -----

# The UTC day of a row, written exactly as the expression index ix_llama_requests_day_username.
_USAGE_DAY = "((created_at AT TIME ZONE 'UTC')::date)"


async def usage_daily_totals(con: Connection, since: date) -> list[dict[str, Any]]:
    """Per UTC day, everyone together: requests, errors, tokens (prompt tokens served from the
    backend's cache among them), and the percentiles of latency and of time to the first byte
    of the answer (percentiles do not add up across users, so they are computed here rather than
    from llama_usage_daily)."""
    rows = await con.fetch(
        f"""SELECT {_USAGE_DAY} AS day,
                   count(*) AS requests,
                   count(*) FILTER (WHERE status_code >= 400) AS errors,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1)
                       AS p95_ms,
                   round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ttfb_ms)::numeric, 1)
                       AS ttfb_p50_ms,
                   round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ttfb_ms)::numeric, 1)
                       AS ttfb_p95_ms,
                   coalesce(sum(cached_tokens), 0) AS cached_tokens
            FROM llama_requests
            WHERE {_USAGE_DAY} >= $1
            GROUP BY 1 ORDER BY 1 DESC""",
        since,
    )
    # Requests without a valid key count as requests and errors, nothing else.
    strangers = {
        row["day"]: int(row["requests"])
        for row in await con.fetch(
            """SELECT ((minute AT TIME ZONE 'UTC')::date) AS day, sum(requests) AS requests
               FROM llama_unauthenticated WHERE minute >= $1::date GROUP BY 1""",
            since,
        )
    }
    return _with_strangers(rows, strangers)


def _with_strangers(rows: list[asyncpg.Record], strangers: dict[date, int]) -> list[dict[str, Any]]:
    empty = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "p50_ms": None,
             "p95_ms": None, "ttfb_p50_ms": None, "ttfb_p95_ms": None}  # fmt: skip
    days = {row["day"]: dict(row) for row in rows}
    for day, requests in strangers.items():
        into = days.setdefault(day, {"day": day, "requests": 0, "errors": 0, **empty})
        into["requests"] += requests
        into["errors"] += requests
    return sorted(days.values(), key=lambda row: row["day"], reverse=True)
