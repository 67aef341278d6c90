"""Key authentication: one answer for every bad key, a cache that spares argon2 and Postgres,
and limits on what bad keys can cost."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import aiohttp
import asyncpg
import pytest

from proxy.appkeys import AUTHENTICATOR
from proxy.auth.apikeys import KeyHasher
from proxy.auth.authenticator import BLOCKED_WAITING, FAILURE_LIMIT, Authenticator
from proxy.db import accounts
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import InvalidApiKey, KeyStoreUnavailable
from tests.cli_helpers import KEY_RE, ok
from tests.proxy_harness import (
    Harness,
    add_key,
    bearer,
    eventually,
    make_user,
    proxy_settings,
    random_key,
    running_proxy,
)

T = TypeVar("T")


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _get(client: aiohttp.ClientSession, proxy: Harness, headers: dict[str, str]) -> int:
    async with client.get(proxy.url("/v1/models"), headers=headers) as response:
        return response.status


async def test_bearer_and_x_api_key_headers_are_both_accepted(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    assert await _get(client, proxy, bearer(key)) == 200
    assert await _get(client, proxy, {"x-api-key": key}) == 200
    assert await _get(client, proxy, {"Authorization": f"bearer   {key}  "}) == 200


async def test_every_kind_of_bad_key_gets_the_same_401(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    good = await proxy.user("alice")
    key_id = good.split("_")[1]
    con = await asyncpg.connect(proxy.dsn)
    try:
        revoked = await add_key(con, (await accounts.get_user(con, "alice"))["id"])
        await accounts.revoke_key(con, revoked.split("_")[1])
        bob = (await accounts.create_user(con, "bob", None, None))["id"]
        expired = await add_key(con, bob, expires_at=datetime.now(UTC) - timedelta(seconds=1))
        carol = (await accounts.create_user(con, "carol", None, None))["id"]
        disabled = await add_key(con, carol)
        await accounts.set_user_enabled(con, "carol", False)
        dave = (await accounts.create_user(con, "dave", None, None))["id"]
        deleted = await add_key(con, dave)
        await accounts.delete_user(con, "dave")
    finally:
        await con.close()
    wrong_secret = f"lgk_{key_id}_{random_key().split('_', 2)[2]}"
    cases = {
        "missing": {},
        "other scheme": {"Authorization": f"Basic {good}"},
        "malformed": bearer("sk-not-ours"),
        "unknown": bearer(random_key()),
        "wrong secret": bearer(wrong_secret),
        "revoked": bearer(revoked),
        "expired": bearer(expired),
        "disabled user": bearer(disabled),
        "deleted user": bearer(deleted),
    }
    bodies = {}
    for cause, headers in cases.items():
        async with client.get(proxy.url("/v1/models"), headers=headers) as r:
            assert r.status == 401, cause
            assert r.headers["WWW-Authenticate"] == "Bearer", cause
            bodies[cause] = await r.json()
    first = bodies["missing"]
    assert first["error"]["code"] == "invalid_api_key"
    assert first["error"]["type"] == "invalid_request_error"
    assert first["error"]["param"] is None
    assert all(body == first for body in bodies.values())  # nothing tells the causes apart
    assert proxy.upstream.seen == []
    assert await _get(client, proxy, bearer(good)) == 200


async def test_a_verified_key_is_served_from_memory_under_a_digest(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    auth = proxy.app[AUTHENTICATOR]
    assert await _get(client, proxy, bearer(key)) == 200
    assert (auth.stats.lookups, auth.stats.argon2) == (1, 1)
    for _ in range(5):
        assert await _get(client, proxy, bearer(key)) == 200
    assert (auth.stats.lookups, auth.stats.argon2, auth.stats.cache_hits) == (1, 1, 5)
    digests = list(auth._cache._entries)
    assert len(digests) == 1
    assert len(digests[0]) == 32
    assert key.encode() not in digests[0]


async def test_a_repeated_bad_key_is_rejected_from_memory(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    auth = proxy.app[AUTHENTICATOR]
    bad = random_key()
    for _ in range(3):
        assert await _get(client, proxy, bearer(bad)) == 401
    assert auth.stats.lookups == 1
    assert await _get(client, proxy, bearer("lgk_short")) == 401
    assert auth.stats.lookups == 1  # not shaped like a key: no query at all


async def test_past_the_failure_limit_an_address_is_checked_one_at_a_time_never_locked_out(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # Lookups are held up on purpose below: a long query timeout keeps them from giving up.
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_DB_TIMEOUT_SECONDS="30") as proxy:
        await _one_at_a_time(proxy, client)


async def _one_at_a_time(proxy: Harness, client: aiohttp.ClientSession) -> None:
    auth = proxy.app[AUTHENTICATOR]
    known = await proxy.user("alice")
    newcomer = await proxy.user("bob")  # behind the same address (a NATed office), never used
    assert await _get(client, proxy, bearer(known)) == 200
    for _ in range(FAILURE_LIMIT):
        assert await _get(client, proxy, bearer(random_key())) == 401
    excess = 5
    admin = await asyncpg.connect(proxy.dsn)
    try:
        async with admin.transaction():
            # Lookups wait on this lock, so the address's keys pile up behind the one in flight.
            await admin.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            flood = [
                asyncio.create_task(_get(client, proxy, bearer(random_key())))
                for _ in range(1 + BLOCKED_WAITING + excess)
            ]
            await eventually(lambda: sum(task.done() for task in flood) == excess)
            async with client.get(proxy.url("/v1/models"), headers=bearer(random_key())) as r:
                assert r.status == 429  # refused at once, without a lookup
                assert 1 <= int(r.headers["Retry-After"]) <= 10
                assert (await r.json())["error"]["code"] == "too_many_authentication_failures"
            assert auth.stats.lookups == 1 + FAILURE_LIMIT  # the flood's first is in flight
    finally:
        await admin.close()
    statuses = Counter(await asyncio.gather(*flood))
    assert statuses == Counter({401: 1 + BLOCKED_WAITING, 429: excess})
    assert auth.stats.lookups == 1 + FAILURE_LIMIT + 1 + BLOCKED_WAITING  # none for the 429s
    assert auth.stats.blocked == excess + 1
    assert await _get(client, proxy, bearer(known)) == 200  # a key that verified still passes
    assert await _get(client, proxy, bearer(newcomer)) == 200  # and a new valid key gets through


async def test_last_used_at_is_written_lazily_in_one_batch(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    assert await _get(client, proxy, bearer(key)) == 200
    con = await asyncpg.connect(proxy.dsn)
    try:
        (row,) = await accounts.list_keys(con, "alice")
        assert row["last_used_at"] is None  # not on the request path
        await proxy.app[AUTHENTICATOR].flush_last_used()
        (row,) = await accounts.list_keys(con, "alice")
        assert row["last_used_at"] is not None
    finally:
        await con.close()


# -- the Authenticator on its own, against the real database ------------------------------


class ThreadRecordingHasher(KeyHasher):
    def __init__(self, **params: int) -> None:
        super().__init__(**params)
        self.threads: list[str] = []

    def verify(self, secret_hash: str, secret: str) -> bool:
        self.threads.append(threading.current_thread().name)
        return super().verify(secret_hash, secret)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def database(db_dsn: str, tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(proxy_settings(db_dsn, 9, tmp_path, LLAMA_PROXY_AUTH_CACHE_SECONDS="30"))
    await database.open()
    yield database
    await database.close()


def _authenticator(
    database: Database, db_dsn: str, tmp_path: Path, **kwargs: object
) -> Authenticator:
    settings = proxy_settings(
        db_dsn,
        9,
        tmp_path,
        LLAMA_PROXY_AUTH_CACHE_SECONDS="30",
        LLAMA_PROXY_AUTH_STALE_SECONDS="600",
    )
    return Authenticator(settings, database, **kwargs)  # type: ignore[arg-type]


async def test_argon2_runs_on_worker_threads_and_concurrent_requests_share_it(
    database: Database, db_dsn: str, tmp_path: Path
) -> None:
    _, key = await make_user(db_dsn, "alice")
    hasher = ThreadRecordingHasher()
    auth = _authenticator(database, db_dsn, tmp_path, hasher=hasher)
    try:
        principals = await asyncio.gather(*(auth.authenticate(key, "10.0.0.1") for _ in range(10)))
    finally:
        await auth.close()
    assert {p.username for p in principals} == {"alice"}
    assert len(hasher.threads) == 1
    assert hasher.threads[0].startswith("argon2")
    assert hasher.threads[0] != threading.main_thread().name


async def test_the_cache_ttl_bounds_staleness_when_no_notification_arrives(
    database: Database, db_dsn: str, tmp_path: Path
) -> None:
    _, key = await make_user(db_dsn, "alice")
    clock = Clock()
    auth = _authenticator(database, db_dsn, tmp_path, clock=clock)
    try:
        await auth.authenticate(key, "10.0.0.1")
        con = await asyncpg.connect(db_dsn)
        try:
            await accounts.revoke_key(con, key.split("_")[1])
        finally:
            await con.close()
        clock.now += 29  # nobody told this authenticator: the cached verdict still stands
        assert (await auth.authenticate(key, "10.0.0.1")).username == "alice"
        clock.now += 2  # past LLAMA_PROXY_AUTH_CACHE_SECONDS: re-checked, and refused
        with pytest.raises(InvalidApiKey):
            await auth.authenticate(key, "10.0.0.1")
        assert len(auth._cache) == 0  # so no outage can bring the revoked key back
        with pytest.raises(InvalidApiKey):
            await auth.authenticate(key, "10.0.0.1")
        assert auth.stats.lookups == 2  # and the refusal is remembered
    finally:
        await auth.close()
    assert auth.stats.argon2 == 1


async def test_a_refresh_after_the_ttl_costs_one_query_and_no_argon2(
    database: Database, db_dsn: str, tmp_path: Path
) -> None:
    _, key = await make_user(db_dsn, "alice")
    clock = Clock()
    auth = _authenticator(database, db_dsn, tmp_path, clock=clock)
    try:
        await auth.authenticate(key, "10.0.0.1")
        clock.now += 31
        await auth.authenticate(key, "10.0.0.1")
    finally:
        await auth.close()
    assert (auth.stats.lookups, auth.stats.argon2) == (2, 1)


async def test_an_outdated_hash_is_replaced_after_a_successful_verification(
    database: Database, db_dsn: str, tmp_path: Path
) -> None:
    old_hasher = KeyHasher(time_cost=2, memory_cost_kib=4096)
    _, key = await make_user(db_dsn, "alice", hasher=old_hasher)
    auth = _authenticator(database, db_dsn, tmp_path)
    try:
        await auth.authenticate(key, "10.0.0.1")
    finally:
        await auth.close()  # waits for the background re-hash
    con = await asyncpg.connect(db_dsn)
    try:
        record = await accounts.lookup_key(con, key.split("_")[1])
    finally:
        await con.close()
    assert record is not None
    assert not KeyHasher().needs_rehash(record.secret_hash)
    assert KeyHasher().verify(record.secret_hash, key.split("_", 2)[2])


class NotifiedMidQuery(Database):
    """Postgres as seen when a notification lands while the key's lookup is in flight."""

    authenticator: Authenticator | None = None
    down = False

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        if self.down:
            raise DatabaseUnavailable("stopped for the test")
        result = await super().run(work)
        if self.authenticator is not None:
            self.authenticator.invalidate_all()
        return result


async def test_a_notification_during_verification_makes_the_next_use_check_again(
    db_dsn: str, tmp_path: Path
) -> None:
    _, key = await make_user(db_dsn, "alice")
    database = NotifiedMidQuery(proxy_settings(db_dsn, 9, tmp_path))
    await database.open()
    auth = _authenticator(database, db_dsn, tmp_path)
    database.authenticator = auth
    try:
        await auth.authenticate(key, "10.0.0.1")
        assert auth.stats.lookups == 2  # it looked again; changes kept coming: answered anyway
        database.authenticator = None
        await auth.authenticate(key, "10.0.0.1")
        assert auth.stats.lookups == 3  # the first verdict was not trusted as fresh
        await auth.authenticate(key, "10.0.0.1")
        assert auth.stats.lookups == 3
        database.down = True  # and the entry was kept, so an outage still finds it
        auth.invalidate_all()
        assert (await auth.authenticate(key, "10.0.0.1")).username == "alice"
    finally:
        await auth.close()
        await database.close()


async def test_while_postgres_is_down_a_verified_key_works_only_within_the_stale_limit(
    db_dsn: str, tmp_path: Path
) -> None:
    _, key = await make_user(db_dsn, "alice")
    database = NotifiedMidQuery(proxy_settings(db_dsn, 9, tmp_path))
    await database.open()
    clock = Clock()
    auth = _authenticator(database, db_dsn, tmp_path, clock=clock)
    try:
        await auth.authenticate(key, "10.0.0.1")
        database.down = True
        clock.now += 599  # long past the 30 s TTL, within LLAMA_PROXY_AUTH_STALE_SECONDS
        assert (await auth.authenticate(key, "10.0.0.1")).username == "alice"
        clock.now += 2
        with pytest.raises(KeyStoreUnavailable):
            await auth.authenticate(key, "10.0.0.1")
    finally:
        await auth.close()
        await database.close()


async def test_a_key_rotated_with_grace_works_until_the_grace_ends(
    proxy: Harness, tmp_path: Path
) -> None:
    env = {"POSTGRES_AUTH_DSN": proxy.dsn, "LLAMA_GATE_HOME": str(tmp_path)}
    # The real CLI, on a thread: it runs its own event loop.
    created = await asyncio.to_thread(ok, env, "create-user", "--username", "rosa")
    old = KEY_RE.findall(created)[0]
    rotated = await asyncio.to_thread(ok, env, "rotate-key", old.split("_")[1], "--grace", "2s")
    new = KEY_RE.findall(rotated)[0]
    async with aiohttp.ClientSession() as client:

        async def status(key: str) -> int:
            async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
                return r.status

        # Both keys work during the grace period, so clients switch without downtime.
        assert (await status(old), await status(new)) == (200, 200)
        await asyncio.sleep(2.2)
        # The grace ends by the clock, cached or not: no notification is needed for it.
        assert (await status(old), await status(new)) == (401, 200)


async def test_a_revocation_during_a_key_check_is_not_lost(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    """A key whose check is under way when its revocation arrives: the requests waiting on that
    check, and every request after the notification, are refused."""
    # A costly hash keeps the check under way for a while (argon2 reads the cost from the hash).
    slow = KeyHasher(time_cost=16, memory_cost_kib=65536)
    _, key = await make_user(proxy.dsn, "alice", hasher=slow)
    authenticator = proxy.app[AUTHENTICATOR]
    first = asyncio.create_task(_get(client, proxy, bearer(key)))
    await eventually(lambda: authenticator.stats.lookups > 0)  # read; argon2 runs now
    assert authenticator.stats.argon2 == 1
    notified = authenticator.stats.invalidations
    con = await asyncpg.connect(proxy.dsn)
    try:
        await accounts.revoke_key(con, key.split("_")[1])
    finally:
        await con.close()
    await eventually(lambda: authenticator.stats.invalidations > notified)
    assert not first.done(), "the check ended before the revocation arrived: make it slower"
    assert await _get(client, proxy, bearer(key)) == 401  # arrived after the notification
    assert await first == 401  # waited on a check that overlapped the revocation
