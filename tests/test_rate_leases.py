"""Leases of rate-limit places (migration 0019): a busy user costs one call to Postgres per lease,
a lone proxy decides exactly as one call per request did, and proxies sharing a database never
admit more than the limit between them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.auth.cache import Principal
from proxy.db import limits
from proxy.db.limits import LeaseReturn
from proxy.db.pool import Database
from proxy.errors import RateLimited
from proxy.limits.leases import MAX_LEASE
from proxy.limits.ratelimit import RateLimiter
from tests.proxy_harness import make_user, proxy_settings


@pytest.fixture
async def admin(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(db_dsn)
    yield con
    await con.close()


async def _rows(con: asyncpg.Connection, user_id: int) -> list[Any]:
    return [
        r["admitted_at"]
        for r in await con.fetch(
            "SELECT admitted_at FROM rate_admissions WHERE user_id = $1 ORDER BY admitted_at",
            user_id,
        )
    ]


async def _counted(con: asyncpg.Connection, user_id: int) -> int:
    """The user's count as the lease function keeps it (it never counts rows)."""
    value = await con.fetchval("SELECT admissions FROM rate_windows WHERE user_id = $1", user_id)
    return int(value)


async def test_leased_places_count_at_once_and_come_back_as_the_admissions_made(
    admin: asyncpg.Connection, db_dsn: str
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    grant = await limits.lease(admin, user_id, 100, 60_000, 1, 8, 1000, None)
    assert (grant.granted, grant.leased, grant.free) == (1, 8, 100)
    assert grant.lease_ends == grant.granted_at + timedelta(seconds=1)
    # Every place is a row at once, stamped at the lease's end: no admission in it is later.
    assert await _rows(admin, user_id) == [grant.lease_ends] * 9
    other = await limits.lease(admin, user_id, 100, 60_000, 1, 0, 0, None)  # another process
    assert other.free == 91
    # Given back with three admissions made: the lease's rows go, three come back at their times.
    used = [grant.granted_at + timedelta(milliseconds=ms) for ms in (0, 120, 480)]
    back = LeaseReturn(grant.lease_ends, 9, used)
    again = await limits.lease(admin, user_id, 100, 60_000, 1, 0, 0, back)
    assert again.free == 100 - 1 - 3
    assert await _rows(admin, user_id) == sorted([*used, other.granted_at, again.granted_at])
    assert await _counted(admin, user_id) == 5
    # Given back twice by mistake: nothing changes (never more rows than went).
    await limits.lease(admin, user_id, 100, 60_000, 0, 0, 0, back)
    assert len(await _rows(admin, user_id)) == await _counted(admin, user_id) == 5
    # A stamp past the lease's end is taken as its end, never later.
    late = await limits.lease(admin, user_id, 100, 60_000, 1, 8, 1000, None)
    assert late.lease_ends is not None
    stray = late.lease_ends + timedelta(seconds=30)
    back = LeaseReturn(late.lease_ends, 9, [stray])
    await limits.lease(admin, user_id, 100, 60_000, 0, 0, 0, back)
    assert max(await _rows(admin, user_id)) == late.lease_ends


async def test_a_lease_takes_at_most_a_quarter_of_what_is_left_and_only_when_all_were_admitted(
    admin: asyncpg.Connection, db_dsn: str
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    first = await limits.lease(admin, user_id, 20, 60_000, 12, 64, 1000, None)
    assert (first.granted, first.leased) == (12, 2)  # 8 were left after the 12: a quarter
    second = await limits.lease(admin, user_id, 20, 60_000, 7, 64, 1000, None)
    assert (second.granted, second.leased, second.free) == (6, 0, 6)  # one refused: no lease
    assert second.retry_after_ms > 0
    assert await _counted(admin, user_id) == 20


def _counting(database: Database) -> list[int]:
    calls: list[int] = []
    real_run = database.run

    async def counting_run(work: Callable[[Any], Any]) -> Any:
        calls.append(1)
        return await real_run(work)

    database.run = counting_run  # type: ignore[method-assign]
    return calls


async def test_one_user_sending_one_request_after_another_costs_a_call_per_lease_exactly(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    limit = 300
    settings = proxy_settings(db_dsn, 1, tmp_path)
    database = Database(settings)
    await database.open()
    calls = _counting(database)
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=limit, rate_window_seconds=60)
    principal = Principal(user_id, "alice", "k", rate_limit=limit, rate_window_seconds=60)
    limiter = RateLimiter(settings, database)
    remaining: list[int] = []
    refused = calls_to_fill = 0
    try:
        for _ in range(limit + 20):
            try:
                headers = await limiter.allow(principal)
            except RateLimited:
                refused += 1
            else:
                remaining.append(int(headers["x-ratelimit-remaining-requests"]))
                calls_to_fill = len(calls)
        # Refusals came only once the limit was reached, and each admission said what was left.
        assert remaining == list(range(limit - 1, -1, -1))
        assert refused == 20
        # A call per request before leases; leases shrink to a quarter of what is left as the
        # window fills, so the last places cost a call each.
        assert calls_to_fill <= limit // 10, f"{calls_to_fill} calls for {limit} admissions"
        await limiter.close()
    finally:
        await database.close()
    # Given back: one row per admission, none in the future, as one call per request left it.
    rows = await _rows(admin, user_id)
    assert len(rows) == await _counted(admin, user_id) == limit
    assert max(rows) <= await admin.fetchval("SELECT clock_timestamp()")


async def test_two_processes_never_admit_more_than_the_limit_and_a_lease_over_is_given_back(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    limit, window = 60, 12  # leases of 1 s
    settings = proxy_settings(db_dsn, 1, tmp_path)
    databases = [Database(settings), Database(settings)]
    for database in databases:
        await database.open()
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=limit, rate_window_seconds=window)
    principal = Principal(user_id, "alice", "k", rate_limit=limit, rate_window_seconds=window)
    first, second = (RateLimiter(settings, database) for database in databases)
    admitted = 0

    async def ask(limiter: RateLimiter) -> bool:
        nonlocal admitted
        try:
            await limiter.allow(principal)
        except RateLimited:
            return False
        admitted += 1
        return True

    try:
        # The first process is busy and holds a lease; the second asks now and then.
        for turn in range(2 * limit):
            await ask(second if turn % 7 == 0 else first)
            assert admitted <= limit
            # Never fewer places held in Postgres than admitted: no one else could over-admit.
            assert await _counted(admin, user_id) >= admitted
        assert admitted <= limit
        # Once a lease is over it is given back, unused places included, without a request.
        await asyncio.sleep(1.5)
        assert await _counted(admin, user_id) == admitted
        while await ask(second):
            pass
        assert admitted == limit  # every place was used in the end, none twice
    finally:
        for limiter in (first, second):
            await limiter.close()
        for database in databases:
            await database.close()
    assert len(await _rows(admin, user_id)) == limit


async def test_a_process_that_dies_with_a_lease_leaves_its_places_held_never_freed_early(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    settings = proxy_settings(db_dsn, 1, tmp_path)
    database = Database(settings)
    await database.open()
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=1000, rate_window_seconds=60)
    principal = Principal(user_id, "alice", "k", rate_limit=1000, rate_window_seconds=60)
    before = await admin.fetchval("SELECT clock_timestamp()")
    limiter = RateLimiter(settings, database)
    try:
        for _ in range(3 * MAX_LEASE):
            await limiter.allow(principal)
    finally:
        await database.close()  # the process is gone: nothing given back
    rows = await _rows(admin, user_id)
    # Every admission still holds a place, each stamped no earlier than it was made.
    assert len(rows) >= 3 * MAX_LEASE
    assert min(rows) >= before
    await limiter.close()  # its pool is closed: nothing can be given back, nothing fails
    assert await _rows(admin, user_id) == rows
