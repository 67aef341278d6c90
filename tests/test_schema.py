"""The audit table's indexes keep the everyday questions cheap at millions of rows."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

ROWS = 1_000_000


async def _plans(dsn: str, queries: list[str]) -> list[str]:
    con = await asyncpg.connect(dsn)
    try:
        # A year of traffic from 200 users, the oldest first, as the proxy would write it.
        await con.execute(
            f"""INSERT INTO llama_requests (username, path, status_code, duration_ms, created_at)
                SELECT 'user' || (n % 200), '/v1/chat/completions', 200, n % 1000,
                       now() - interval '365 days' * (1 - n::float8 / {ROWS})
                FROM generate_series(1, {ROWS}) AS n"""
        )
        await con.execute("ANALYZE llama_requests")
        plans = []
        for query in queries:
            rows = await con.fetch(f"EXPLAIN {query}")
            plans.append("\n".join(row[0] for row in rows))
        return plans
    finally:
        await con.close()


@pytest.mark.slow
def test_last_30_days_queries_use_indexes(db_dsn: str) -> None:
    queries = [
        # The daily view, for everyone and for one user.
        "SELECT * FROM llama_usage_daily WHERE day >= current_date - 30",
        "SELECT * FROM llama_usage_daily WHERE day >= current_date - 30 AND username = 'user7'",
        # The raw table, the way existing deployments query it.
        """SELECT date_trunc('day', created_at), count(*), sum(response_bytes)
           FROM llama_requests WHERE username = 'user7' AND created_at > now() - interval '30 days'
           GROUP BY 1""",
        "SELECT count(*) FROM llama_requests WHERE created_at > now() - interval '30 days'",
    ]
    for query, plan in zip(queries, asyncio.run(_plans(db_dsn, queries)), strict=True):
        assert "Seq Scan on llama_requests" not in plan, f"{query}\n{plan}"
        assert "Index" in plan, f"{query}\n{plan}"
