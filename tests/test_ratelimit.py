"""Per-user sliding-window rate limits: the shared window in Postgres, the 429 and headers
clients read, and the process-local window used while Postgres is away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.auth.cache import Principal
from proxy.db import limits
from proxy.db.pool import Database
from proxy.errors import InvalidApiKey, RateLimited
from proxy.limits.ratelimit import RateLimiter, format_duration
from proxy.window import Admission, SlidingWindows
from tests.proxy_harness import Harness, bearer, make_user, proxy_settings, running_proxy


@pytest.fixture
async def admin(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(db_dsn)
    yield con
    await con.close()


async def _admitted_at(con: asyncpg.Connection, user_id: int, *seconds_ago: float) -> None:
    await con.executemany(
        """INSERT INTO rate_admissions (user_id, admitted_at)
           VALUES ($1, clock_timestamp() - $2 * interval '1 second')""",
        [(user_id, ago) for ago in seconds_ago],
    )


async def _admit(con: asyncpg.Connection, user_id: int, limit: int, window_ms: int) -> Admission:
    """One request decided as a proxy asks when it leases nothing."""
    grant = await limits.lease(con, user_id, limit, window_ms, 1, 0, 0, None)
    assert grant.leased == 0
    assert grant.lease_ends is None
    remaining = max(grant.free - grant.granted, 0)
    return Admission(grant.granted == 1, remaining, grant.reset_ms, grant.retry_after_ms)


async def test_the_window_slides_rather_than_resetting_in_buckets(
    admin: asyncpg.Connection, db_dsn: str
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    await _admitted_at(admin, user_id, 59.5, 30)
    denied = await _admit(admin, user_id, 2, 60_000)
    assert not denied.admitted
    assert 0 < denied.retry_after_ms <= 600  # the 59.5 s old one leaves in about 0.5 s
    assert denied.remaining == 0

    await admin.execute("DELETE FROM rate_admissions")
    await _admitted_at(admin, user_id, 60.5, 30)  # one has just left the window
    admitted = await _admit(admin, user_id, 2, 60_000)
    assert admitted.admitted
    assert admitted.remaining == 0
    assert 29_000 < admitted.reset_ms <= 30_100  # when the 30 s old one leaves
    count = await admin.fetchval("SELECT count(*) FROM rate_admissions")
    assert count == 2  # the expired one was pruned, the new one added


async def test_a_decision_commits_without_waiting_for_the_disk_and_only_its_own(
    admin: asyncpg.Connection, db_dsn: str
) -> None:
    """It writes only UNLOGGED tables, which a crash empties anyway: its commit need not wait
    for the WAL flush. The setting is its transaction's alone."""
    user_id, _ = await make_user(db_dsn, "alice")
    await admin.execute("SET synchronous_commit = on")  # as a default-durability server has it
    async with admin.transaction():
        await _admit(admin, user_id, 5, 60_000)
        assert await admin.fetchval("SHOW synchronous_commit") == "off"
    assert await admin.fetchval("SHOW synchronous_commit") == "on"
    tables = await admin.fetch(
        """SELECT relname, relpersistence::text FROM pg_class
           WHERE relname IN ('rate_admissions', 'rate_windows') ORDER BY relname"""
    )
    assert [(t["relname"], t["relpersistence"]) for t in tables] == [
        ("rate_admissions", "u"),
        ("rate_windows", "u"),
    ]


async def test_a_lowered_limit_waits_for_enough_admissions_to_leave(
    admin: asyncpg.Connection, db_dsn: str
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    await _admitted_at(admin, user_id, 50, 40, 30, 20, 10)
    denied = await _admit(admin, user_id, 2, 60_000)
    assert not denied.admitted
    assert 39_000 < denied.retry_after_ms <= 40_100  # four must leave; the 4th oldest is 20 s old
    assert await admin.fetchval("SELECT count(*) FROM rate_admissions") == 5  # refusals add none


async def test_windows_are_per_user(admin: asyncpg.Connection, db_dsn: str) -> None:
    alice, _ = await make_user(db_dsn, "alice")
    bob, _ = await make_user(db_dsn, "bob")
    assert (await _admit(admin, alice, 1, 60_000)).admitted
    assert not (await _admit(admin, alice, 1, 60_000)).admitted
    assert (await _admit(admin, bob, 1, 60_000)).admitted


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_RATE_LIMIT="2") as harness:
        yield harness


async def test_admitted_responses_say_what_is_left_and_the_next_gets_an_openai_429(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice", rate_limit=3, rate_window_seconds=60)
    async with aiohttp.ClientSession() as client:
        for remaining in (2, 1, 0):
            async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
                assert r.status == 200
                assert r.headers["x-ratelimit-limit-requests"] == "3"
                assert r.headers["x-ratelimit-remaining-requests"] == str(remaining)
                assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 429
            body = await r.json()
            retry_ms = int(r.headers["retry-after-ms"])
            assert 59_000 < retry_ms <= 60_000
            assert r.headers["Retry-After"] == str(-(-retry_ms // 1000))  # whole seconds, up
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert body["error"]["param"] is None
    assert "3 requests per 60 s" in body["error"]["message"]
    assert len(proxy.upstream.seen) == 3


async def test_the_default_limit_applies_without_an_override_and_limits_are_per_user(
    proxy: Harness,
) -> None:
    alice = await proxy.user("alice")
    bob = await proxy.user("bob")
    async with aiohttp.ClientSession() as client:
        statuses = []
        for _ in range(3):
            async with client.get(proxy.url("/v1/models"), headers=bearer(alice)) as r:
                statuses.append(r.status)
        async with client.get(proxy.url("/v1/models"), headers=bearer(bob)) as r:
            assert r.status == 200
    assert statuses == [200, 200, 429]


async def test_retry_after_ms_says_when_the_next_request_is_admitted(proxy: Harness) -> None:
    key = await proxy.user("alice", rate_limit=2, rate_window_seconds=1)
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
                assert r.status == 200
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 429
            wait_ms = int(r.headers["retry-after-ms"])
        assert wait_ms <= 1000
        await asyncio.sleep(wait_ms / 1000 + 0.05)
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 200


async def test_refused_and_malformed_requests_spend_no_quota(proxy: Harness) -> None:
    key = await proxy.user("alice", rate_limit=1, rate_window_seconds=60)
    headers = {**bearer(key), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url("/v1/chat/completions"), data=b"{", headers=headers) as r:
            assert r.status == 400
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 200


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_local_window_is_exact_and_sliding() -> None:
    clock = Clock()
    windows: SlidingWindows[int] = SlidingWindows(clock)
    assert windows.try_acquire(1, 2, 10).admitted  # t=100
    clock.now = 105
    second = windows.try_acquire(1, 2, 10)
    assert (second.admitted, second.remaining, second.reset_ms) == (True, 0, 5000)
    clock.now = 109.9
    denied = windows.try_acquire(1, 2, 10)
    assert (denied.admitted, denied.retry_after_ms) == (False, 100)
    clock.now = 110.0  # the t=100 admission leaves; the t=105 one stays
    assert windows.try_acquire(1, 2, 10).admitted
    assert not windows.try_acquire(1, 2, 10).admitted
    assert windows.try_acquire(2, 2, 10).admitted  # another user


def test_the_local_window_forgets_the_oldest_keys_beyond_its_bound() -> None:
    windows: SlidingWindows[int] = SlidingWindows(Clock(), max_keys=2)
    for user in (1, 2, 3):
        windows.add(user, 10)
    assert windows.blocked_for_ms(1, 1, 10) == 0  # forgotten
    assert windows.blocked_for_ms(3, 1, 10) == 10_000


@pytest.mark.parametrize(
    ("ms", "text"), [(250, "250ms"), (1000, "1s"), (1500, "1.5s"), (59_999, "59.999s"),
                     (60_000, "1m0s"), (90_500, "1m30.5s")]
)  # fmt: skip
def test_reset_times_are_spelled_like_openais(ms: int, text: str) -> None:
    assert format_duration(ms) == text


async def test_a_burst_is_decided_in_few_rounds_and_admits_exactly_the_limit(
    db_dsn: str, tmp_path: Path
) -> None:
    settings = proxy_settings(db_dsn, 1, tmp_path)
    database = Database(settings)
    await database.open()
    calls: list[int] = []
    real_run = database.run

    async def counting_run(work: Any) -> Any:
        calls.append(1)
        return await real_run(work)

    database.run = counting_run  # type: ignore[method-assign]
    try:
        user_id, _ = await make_user(db_dsn, "alice", rate_limit=20, rate_window_seconds=60)
        limiter = RateLimiter(settings, database)
        principal = Principal(user_id, "alice", "k", rate_limit=20, rate_window_seconds=60)
        outcomes = await asyncio.gather(
            *(limiter.allow(principal) for _ in range(50)), return_exceptions=True
        )
    finally:
        await database.close()
    admitted = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert (len(admitted), len(refused)) == (20, 30)
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for h in admitted)
    assert remaining == list(range(20))
    assert len(calls) <= 3, f"{len(calls)} round trips for one burst"


async def test_a_user_deleted_while_cached_is_refused_not_taken_for_an_outage(
    db_dsn: str, tmp_path: Path
) -> None:
    settings = proxy_settings(db_dsn, 1, tmp_path)
    database = Database(settings)
    await database.open()
    try:
        limiter = RateLimiter(settings, database)
        ghost = Principal(987654, "ghost", "k", rate_limit=5, rate_window_seconds=60)
        with pytest.raises(InvalidApiKey):
            await limiter.allow(ghost)
        assert database.up  # one odd query does not make everyone skip Postgres
        alice, _ = await make_user(db_dsn, "alice")
        headers = await limiter.allow(Principal(alice, "alice", "k", None, None))
        assert headers["x-ratelimit-remaining-requests"] == str(settings.rate_limit - 1)
    finally:
        await database.close()
