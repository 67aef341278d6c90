"""Leases of rate-limit places (migration 0019): a busy user costs one call to Postgres per lease,
a lone proxy decides exactly as one call per request did, and proxies sharing a database never
admit more than the limit between them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.auth.cache import Principal
from proxy.db import limits
from proxy.db.limits import LeaseReturn
from proxy.db.pool import Database
from proxy.errors import InvalidApiKey, RateLimited
from proxy.limits.leases import LONGEST_LEASE_MS, MAX_LEASE, Lease, clock
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
    # Every place is a row at once: the request decided now, and the leased places stamped at
    # the lease's end (no admission made in it is later).
    assert await _rows(admin, user_id) == [grant.granted_at] + [grant.lease_ends] * 8
    other = await limits.lease(admin, user_id, 100, 60_000, 1, 0, 0, None)  # another process
    assert other.free == 91
    # Given back with two admissions made in it: its rows go, two come back at their times.
    used = [grant.granted_at + timedelta(milliseconds=ms) for ms in (120, 480)]
    back = LeaseReturn(grant.lease_ends, 8, used)
    again = await limits.lease(admin, user_id, 100, 60_000, 1, 0, 0, back)
    assert again.free == 100 - 4
    assert await _rows(admin, user_id) == sorted(
        [grant.granted_at, *used, other.granted_at, again.granted_at]
    )
    assert await _counted(admin, user_id) == 5
    # Given back twice by mistake: nothing changes (never more rows than went).
    await limits.lease(admin, user_id, 100, 60_000, 0, 0, 0, back)
    assert len(await _rows(admin, user_id)) == await _counted(admin, user_id) == 5
    # A stamp past the lease's end is taken as its end, never later.
    late = await limits.lease(admin, user_id, 100, 60_000, 1, 8, 1000, None)
    assert late.lease_ends is not None
    stray = late.lease_ends + timedelta(seconds=30)
    back = LeaseReturn(late.lease_ends, late.leased, [stray])
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
    # Given back: one row per admission, none later than it was made (but for the stamps'
    # margin, a millisecond and a thousandth), as one call per request left it.
    rows = await _rows(admin, user_id)
    assert len(rows) == await _counted(admin, user_id) == limit
    assert max(rows) <= await admin.fetchval("SELECT clock_timestamp()") + timedelta(
        milliseconds=10
    )


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
    died = await admin.fetchval("SELECT clock_timestamp()")
    rows = await _rows(admin, user_id)
    # Every admission still holds a place, each stamped no earlier than it was made ...
    assert len(rows) >= 3 * MAX_LEASE
    assert min(rows) >= before
    # ... and the places of the lease it held are stamped at that lease's end, still to come:
    # they leave the window no sooner than the last admission the lease could have made.
    leased = [at for at in rows if at > died]
    assert leased, "no place of the dead process's lease is held past its death"
    assert max(leased) <= died + timedelta(milliseconds=LONGEST_LEASE_MS + 100)
    await limiter.close()  # its pool is closed: nothing can be given back, nothing fails
    assert await _rows(admin, user_id) == rows


# -- what an adversarial review found (each failed before its fix) ------------------------------

LOCK = "SELECT pg_advisory_lock(hashtextextended('llama_gate.rate.' || $1::text, 0))"
UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('llama_gate.rate.' || $1::text, 0))"


async def _fill(limiter: RateLimiter, principal: Principal) -> int:
    admitted = 0
    while True:
        try:
            await limiter.allow(principal)
        except RateLimited:
            return admitted
        admitted += 1


def _principal(user_id: int, name: str, limit: int, window: int) -> Principal:
    return Principal(user_id, name, "k", rate_limit=limit, rate_window_seconds=window)


async def test_a_lease_renewed_while_the_sweeper_gives_back_another_is_not_lost(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    """The sweeper is held in alice's give-back (her advisory lock taken here) while bob's
    over lease is renewed by a round: bob's fresh lease must still be given back, so a lone
    process admits exactly his limit. Before the fix the sweeper dropped it: 9 of 10."""
    database = Database(proxy_settings(db_dsn, 1, tmp_path))
    await database.open()
    limit, window = 10, 12  # leases of 1 s
    alice, _ = await make_user(db_dsn, "alice", rate_limit=100, rate_window_seconds=window)
    bob, _ = await make_user(db_dsn, "bob", rate_limit=limit, rate_window_seconds=window)
    a, b = _principal(alice, "alice", 100, window), _principal(bob, "bob", limit, window)
    limiter = RateLimiter(proxy_settings(db_dsn, 1, tmp_path), database)
    try:
        for principal in (a, a, b, b):  # each second request brings its user a lease
            await limiter.allow(principal)
        await admin.fetchval(LOCK, str(alice))
        await asyncio.sleep(1.15)  # both leases over: the sweeper waits in alice's give-back
        await limiter.allow(b)  # bob's round: his old lease given back, a fresh one
        await asyncio.sleep(0.2)
        await admin.fetchval(UNLOCK, str(alice))
        await asyncio.sleep(1.3)  # bob's fresh lease is over and given back
        assert 3 + await _fill(limiter, b) == limit  # bob asked three times before
    finally:
        await limiter.close()
        await database.close()


async def test_the_sweeper_outlives_a_failed_round_and_close_gives_everything_back(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    database = Database(proxy_settings(db_dsn, 1, tmp_path))
    await database.open()
    window = 12
    names = ("alice", "bob", "carol")
    ids = [(await make_user(db_dsn, n, rate_limit=100, rate_window_seconds=window))[0]
           for n in names]  # fmt: skip
    a, b, c = (_principal(i, n, 100, window) for i, n in zip(ids, names, strict=True))
    limiter = RateLimiter(proxy_settings(db_dsn, 1, tmp_path), database)
    try:
        for principal in (a, a, b, b, c, c):
            await limiter.allow(principal)
        await admin.fetchval(LOCK, str(ids[0]))
        await asyncio.sleep(1.15)  # the sweeper waits in alice's give-back
        await admin.execute("DELETE FROM users WHERE id = $1", ids[1])
        with pytest.raises(InvalidApiKey):
            await limiter.allow(b)  # bob's key still cached here: his round fails
        await admin.fetchval(UNLOCK, str(ids[0]))
        await asyncio.sleep(0.3)
    finally:
        await limiter.close()  # raised the sweeper's KeyError before the fix
        await database.close()
    now = await admin.fetchval("SELECT clock_timestamp()")
    for user_id in (ids[0], ids[2]):  # every lease given back: nothing stamped at a lease's end
        rows = await _rows(admin, user_id)
        assert len(rows) == 2
        assert max(rows) <= now


async def test_close_waits_for_a_round_under_way_and_gives_its_lease_back(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    database = Database(proxy_settings(db_dsn, 1, tmp_path))
    await database.open()
    limit, window = 100, 12
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=limit, rate_window_seconds=window)
    principal = _principal(user_id, "alice", limit, window)
    limiter = RateLimiter(proxy_settings(db_dsn, 1, tmp_path), database)
    try:
        for _ in range(6):  # a lease of 4 used up: the next request is a round
            await limiter.allow(principal)
        await admin.fetchval(LOCK, str(user_id))  # the round waits on the user's lock
        request = asyncio.create_task(limiter.allow(principal))
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(limiter.close())
        await asyncio.sleep(0.2)
        await admin.fetchval(UNLOCK, str(user_id))
        await request
        await closing
    finally:
        await database.close()
    rows = await _rows(admin, user_id)
    assert len(rows) == 7  # the seven admissions, nothing leased left held
    assert max(rows) <= await admin.fetchval("SELECT clock_timestamp()")


async def test_a_round_while_the_sweeper_gives_back_is_decided_after_that_lease_came_back(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Give-backs made slow (0.3 s): a request arriving while one is on its way must not be
    decided against the unused places it returns (before the fix: 5 of the 6 free admitted)."""
    real = limits.lease

    async def slow_give_back(con: Any, holder: Any, limit: int, window_ms: int, count: int,
                             *rest: Any) -> Any:  # fmt: skip
        if count == 0:
            await asyncio.sleep(0.3)
        return await real(con, holder, limit, window_ms, count, *rest)

    monkeypatch.setattr(limits, "lease", slow_give_back)
    database = Database(proxy_settings(db_dsn, 1, tmp_path))
    await database.open()
    limit, window = 20, 12
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=limit, rate_window_seconds=window)
    await admin.executemany(
        """INSERT INTO rate_admissions (user_id, admitted_at)
           VALUES ($1, clock_timestamp() - interval '5 seconds')""",
        [(user_id,)] * 12,
    )
    principal = _principal(user_id, "alice", limit, window)
    limiter = RateLimiter(proxy_settings(db_dsn, 1, tmp_path), database)

    async def ask() -> bool:
        try:
            await limiter.allow(principal)
        except RateLimited:
            return False
        return True

    try:
        assert await ask()
        assert await ask()  # and a lease of the places left
        await asyncio.sleep(1.15)  # the lease is over; the sweeper is giving it back
        assert sum(await asyncio.gather(*(ask() for _ in range(7)))) == 6
    finally:
        await limiter.close()
        await database.close()


def test_a_lease_is_not_used_once_the_wall_clock_says_it_is_over() -> None:
    """A process clock that stood still (a host suspended, where no clock counts on) must not
    make a lease look young: the wall clock says it is over."""
    now = datetime.now(UTC)
    grant = limits.LeaseGrant(1, 4, 100, 1000, 0, now, now + timedelta(seconds=5))
    lease = Lease.of(grant, clock(), time.time() - 6, clock(), 5000)  # sent 6 s ago, by the wall
    assert lease.take(clock()) is None
    fresh = Lease.of(grant, clock(), time.time(), clock(), 5000)
    taken = fresh.take(clock())
    assert taken is not None
    assert taken.admitted
    given_back = fresh.given_back()
    assert given_back is not None
    assert now < given_back.used_at[-1] <= grant.lease_ends  # stamped later, inside the lease


async def test_a_refusal_while_another_process_holds_a_lease_says_to_retry_when_it_ends(
    admin: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    settings = proxy_settings(db_dsn, 1, tmp_path)
    databases = [Database(settings), Database(settings)]
    for database in databases:
        await database.open()
    limit, window = 24, 12  # leases of 1 s
    user_id, _ = await make_user(db_dsn, "alice", rate_limit=limit, rate_window_seconds=window)
    principal = _principal(user_id, "alice", limit, window)
    first, second = (RateLimiter(settings, database) for database in databases)
    try:
        for _ in range(2):
            await first.allow(principal)  # the second brings a lease of 4
        assert await _counted(admin, user_id) == 6
        await admin.executemany(  # the rest of the window taken, long ago
            """INSERT INTO rate_admissions (user_id, admitted_at)
               VALUES ($1, clock_timestamp() - interval '2 seconds')""",
            [(user_id,)] * (limit - 6),
        )
        await admin.execute(
            "UPDATE rate_windows SET admissions = $2 WHERE user_id = $1", user_id, limit
        )
        with pytest.raises(RateLimited) as refused:
            await second.allow(principal)
        # Not the ~10 s until the oldest admission leaves: the first's lease ends within 1 s.
        assert 0 < int(refused.value.headers["retry-after-ms"]) <= 1000 + 200
    finally:
        for limiter in (first, second):
            await limiter.close()
        for database in databases:
            await database.close()
