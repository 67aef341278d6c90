"""Requests without a valid key: counted per client address and minute, a bounded number of
rows a minute however large the flood, never a `llama_requests` row each."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

from proxy.audit.row import AuditRow
from proxy.audit.strangers import OTHERS, Strangers
from proxy.db.pool import Database
from tests.proxy_harness import bearer, proxy_settings, random_key, running_proxy


def _row(address: str, path: str = "/v1/models", status: int = 401) -> AuditRow:
    return AuditRow(
        None, datetime(2026, 12, 6, 12, 30, 15, tzinfo=UTC), None, None, None, "GET", path,
        None, None, status, 1.0, None, None, 10, 0, None, None, address, "invalid_api_key",
    )  # fmt: skip


async def _table(dsn: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch("SELECT * FROM llama_unauthenticated ORDER BY client_addr")
    finally:
        await con.close()


async def test_a_flood_from_many_addresses_is_a_bounded_number_of_rows(
    db_dsn: str, tmp_path: Path
) -> None:
    database = Database(proxy_settings(db_dsn, 9, tmp_path))
    await database.open()
    try:
        strangers = Strangers(database, max_addresses=3, max_paths=2)
        for index in range(1000):  # 1000 requests from 100 addresses, 5 paths
            strangers.observe(_row(f"10.0.0.{index % 100}", f"/v1/p{index % 5}"))
        await strangers.flush()
        for _ in range(10):  # the next flush of the same minute adds to the same rows
            strangers.observe(_row("10.0.0.0", "/v1/p0", status=404))
        await strangers.flush()
    finally:
        await database.close()
    rows = await _table(db_dsn)
    assert [row["client_addr"] for row in rows] == [OTHERS, "10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert sum(row["requests"] for row in rows) == 1010
    first = rows[1]
    assert first["requests"] == 20
    assert json.loads(first["statuses"]) == {"401": 10, "404": 10}
    assert json.loads(first["paths"]) == {"/v1/p0": 20}
    others = rows[0]
    assert others["requests"] == 1000 - 30
    named = set(json.loads(others["paths"])) - {OTHERS}
    assert len(named) == 2  # at most 2 paths by name; the rest together
    assert all(row["minute"] == datetime(2026, 12, 6, 12, 30, tzinfo=UTC) for row in rows)


async def test_counts_wait_in_memory_while_postgres_is_away(db_dsn: str, tmp_path: Path) -> None:
    database = Database(proxy_settings(db_dsn, 9, tmp_path))
    strangers = Strangers(database)  # never opened: every query fails as an outage would
    strangers.observe(_row("10.0.0.1"))
    await strangers.flush()
    assert strangers.pending == 1
    await database.open()
    try:
        strangers.observe(_row("10.0.0.1"))
        await strangers.flush()
    finally:
        await database.close()
    assert strangers.pending == 0
    assert [row["requests"] for row in await _table(db_dsn)] == [2]


async def test_bad_keys_through_the_proxy_leave_counts_not_rows(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        alice = await proxy.user("alice")
        async with aiohttp.ClientSession() as client:

            async def get(path: str, key: str | None) -> int:
                headers = bearer(key) if key else {}
                async with client.get(proxy.url(path), headers=headers) as r:
                    await r.read()
                    return r.status

            junk = await asyncio.gather(
                *(get("/v1/models", random_key()) for _ in range(40)),
                *(get("/v1/models", None) for _ in range(40)),
                *(get(f"/nowhere/{i}", None) for i in range(40)),
            )
            assert await get("/v1/models", alice) == 200
        [counted] = await proxy.strangers()
        rows = await proxy.wait_for_records(121)
    # Past 20 failures from one address, unknown keys wait their turn or get a 429 at once.
    assert set(junk) <= {401, 404, 429}
    assert counted["requests"] == 120
    statuses = json.loads(counted["statuses"])
    assert statuses["404"] == 40
    assert statuses.get("401", 0) + statuses.get("429", 0) == 80
    assert sum(json.loads(counted["paths"]).values()) == 120
    con = await asyncpg.connect(db_dsn)
    try:
        ledger = await con.fetch("SELECT username, status_code FROM llama_requests")
        daily = await con.fetch("SELECT username, requests, errors FROM llama_usage_daily")
    finally:
        await con.close()
    assert [tuple(row) for row in ledger] == [("alice", 200)]  # the one request with a key
    assert len(rows) == 121  # every request still reaches the hooks (metrics count them all)
    assert sorted((r["username"] or "", r["requests"], r["errors"]) for r in daily) == [
        ("", 120, 120),
        ("alice", 1, 0),
    ]
