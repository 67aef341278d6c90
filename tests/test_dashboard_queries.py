"""The dashboard's queries (the same as `llama-gate usage`'s) stay index scans at a million rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from proxy.db import ledger, usage
from proxy.db.ledger import RequestFilter

ROWS = 1_000_000
USERS = 200


class _Captured:
    """Stands in for a connection just to learn the SQL and arguments a query sends."""

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        self.query, self.args = query, args
        return []


async def _captured(call: Callable[[Any], Awaitable[object]]) -> tuple[str, tuple[Any, ...]]:
    captured = _Captured()
    await call(captured)
    return captured.query, captured.args


@pytest.mark.slow
async def test_overview_and_request_log_queries_use_indexes(db_dsn: str) -> None:
    today = datetime.now(UTC).date()
    since = today - timedelta(days=29)
    cursor = (datetime.now(UTC) - timedelta(days=3), 10**9)
    month = datetime.now(UTC) - timedelta(days=30)
    calls: list[Callable[[Any], Awaitable[object]]] = [
        lambda con: usage.usage_daily(con, since, None),
        lambda con: usage.usage_daily(con, since, "user7"),
        lambda con: usage.usage_daily_totals(con, since),
        lambda con: ledger.request_log(con, RequestFilter(), None, 51),
        lambda con: ledger.request_log(con, RequestFilter(), cursor, 51),
        lambda con: ledger.request_log(con, RequestFilter(username="user7"), cursor, 51),
        lambda con: ledger.request_log(
            con, RequestFilter(status_from=500, status_to=599, since=month), None, 51
        ),
        lambda con: ledger.request_log(
            con, RequestFilter(path="/v1/embeddings", until=cursor[0]), cursor, 2000
        ),
    ]
    captured = [await _captured(call) for call in calls]
    con = await asyncpg.connect(db_dsn)
    try:
        # A year of traffic from 200 users, the oldest first, as the proxy would write it.
        await con.execute(
            f"""INSERT INTO llama_requests (user_id, username, path, status_code, duration_ms,
                                            ttfb_ms, prompt_tokens, completion_tokens, created_at)
                SELECT 1 + n % {USERS}, 'user' || (1 + n % {USERS}),
                       CASE WHEN n % 10 = 0 THEN '/v1/embeddings' ELSE '/v1/chat/completions' END,
                       CASE WHEN n % 333 = 0 THEN 502 ELSE 200 END, n % 1000, n % 300, 20, 50,
                       now() - interval '365 days' * (1 - n::float8 / {ROWS})
                FROM generate_series(1, {ROWS}) AS n;
                ANALYZE llama_requests;
                -- And a year of keyless requests, counted per address and minute.
                INSERT INTO llama_unauthenticated
                            (minute, client_addr, requests, statuses, paths)
                SELECT date_trunc('minute', now()) - interval '1 minute' * (n * 3),
                       '10.0.' || (n % 10) || '.1', 3, '{{"401": 3}}', '{{"/v1/models": 3}}'
                FROM generate_series(1, 200000) AS n;
                ANALYZE llama_unauthenticated"""
        )
        plans = []
        for query, args in captured:
            rows = await con.fetch("EXPLAIN " + query, *args)
            plans.append("\n".join(row[0] for row in rows))
        totals = await usage.usage_daily_totals(con, since)  # and run for real
    finally:
        await con.close()
    for (query, _), plan in zip(captured, plans, strict=True):
        assert "Seq Scan on llama_requests" not in plan, f"{query}\n{plan}"
        assert "Seq Scan on llama_unauthenticated" not in plan, f"{query}\n{plan}"
        assert "Index" in plan, f"{query}\n{plan}"
    assert len(totals) == 30
    assert all(isinstance(row["day"], date) for row in totals)
