"""The token-quota query stays an index range scan at millions of audit rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from proxy.db import usage

ROWS = 1_000_000
USERS = 200


class _Captured:
    """Stands in for a connection just to learn the SQL and arguments `store` sends."""

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any]:
        self.query, self.args = query, args
        return {"day": 0, "minute": 0, "minute_oldest": None, "seen": []}


@pytest.mark.slow
async def test_a_users_tokens_today_are_read_through_the_user_id_index(db_dsn: str) -> None:
    now = datetime.now(UTC)
    captured = _Captured()
    await usage.user_tokens(
        captured,  # type: ignore[arg-type]
        7,
        now.replace(hour=0, minute=0, second=0, microsecond=0),
        now - timedelta(minutes=1),
        ["a", "b"],
        now - timedelta(seconds=5),
    )
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute(
            f"""INSERT INTO users (username) SELECT 'user' || n FROM generate_series(1, {USERS}) n;
                INSERT INTO llama_requests (user_id, username, path, status_code, duration_ms,
                                            prompt_tokens, completion_tokens, created_at)
                SELECT 1 + n % {USERS}, 'user' || (1 + n % {USERS}), '/v1/chat/completions', 200,
                       n % 1000, 20, 50, now() - interval '365 days' * (1 - n::float8 / {ROWS})
                FROM generate_series(1, {ROWS}) AS n;
                ANALYZE llama_requests"""
        )
        plan = "\n".join(
            row[0] for row in await con.fetch("EXPLAIN " + captured.query, *captured.args)
        )
    finally:
        await con.close()
    assert "Seq Scan on llama_requests" not in plan, plan
    assert "ix_llama_requests_user_id_created_at" in plan, plan
