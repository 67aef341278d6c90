"""Revoking a key or disabling/deleting a user reaches a running proxy within a second, through
LISTEN/NOTIFY, and still does after the listener's connection is cut and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.appkeys import AUTH_LISTENER, AUTHENTICATOR
from proxy.db import accounts
from tests.proxy_harness import Harness, bearer, eventually, running_proxy


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    # A long cache TTL, so only a notification can explain a refusal within a second.
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_AUTH_CACHE_SECONDS="300") as harness:
        yield harness


@pytest.fixture
async def admin(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(db_dsn)
    yield con
    await con.close()


async def _status(client: aiohttp.ClientSession, proxy: Harness, key: str) -> int:
    async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as response:
        return response.status


async def _seconds_until(
    client: aiohttp.ClientSession, proxy: Harness, key: str, status: int
) -> float:
    started = time.monotonic()
    while (got := await _status(client, proxy, key)) != status:
        assert got in {200, 401}
        assert time.monotonic() - started < 5, "the change never reached the proxy"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


Change = Callable[[asyncpg.Connection, str], Awaitable[object]]
CHANGES: dict[str, Change] = {
    "revoke key": lambda con, key: accounts.revoke_key(con, key.split("_")[1]),
    "disable user": lambda con, _key: accounts.set_user_enabled(con, "alice", False),
    "delete user": lambda con, _key: accounts.delete_user(con, "alice"),
}


@pytest.mark.parametrize("change", CHANGES)
async def test_a_revocation_takes_effect_within_one_second(
    proxy: Harness, admin: asyncpg.Connection, change: str
) -> None:
    key = await proxy.user("alice")
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy, key) == 200
        lookups = proxy.app[AUTHENTICATOR].stats.lookups
        assert await _status(client, proxy, key) == 200
        assert proxy.app[AUTHENTICATOR].stats.lookups == lookups  # it is cached
        await CHANGES[change](admin, key)
        assert await _seconds_until(client, proxy, key, 401) < 1.0


async def test_re_enabling_a_user_takes_effect_within_one_second(
    proxy: Harness, admin: asyncpg.Connection
) -> None:
    key = await proxy.user("alice")
    await accounts.set_user_enabled(admin, "alice", False)
    async with aiohttp.ClientSession() as client:
        assert await _seconds_until(client, proxy, key, 401) < 1.0  # and remembered as bad
        await accounts.set_user_enabled(admin, "alice", True)
        assert await _seconds_until(client, proxy, key, 200) < 1.0


async def test_the_listener_reconnects_and_rechecks_what_it_may_have_missed(
    proxy: Harness, admin: asyncpg.Connection
) -> None:
    key = await proxy.user("alice")
    listener = proxy.app[AUTH_LISTENER]
    auth = proxy.app[AUTHENTICATOR]
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy, key) == 200
        lookups = auth.stats.lookups
        killed = await admin.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE application_name = 'llama-gate auth listener'
                 AND datname = current_database()"""
        )
        assert killed == 1
        async with asyncio.timeout(10):
            while listener.connections < 2 or not listener.connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # Every cached key was re-checked at once, in one query, as the listener came back...
        await eventually(lambda: auth.stats.rechecks == 1)
        assert await _status(client, proxy, key) == 200
        assert auth.stats.lookups == lookups  # ... so its holder did not wait for a re-check
        await accounts.revoke_key(admin, key.split("_")[1])
        assert await _seconds_until(client, proxy, key, 401) < 1.0


async def test_a_key_revoked_while_the_listener_was_away_is_refused_as_it_returns(
    proxy: Harness, admin: asyncpg.Connection
) -> None:
    key = await proxy.user("alice")
    other = await proxy.user("bob")
    listener = proxy.app[AUTH_LISTENER]
    auth = proxy.app[AUTHENTICATOR]
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy, key) == 200
        assert await _status(client, proxy, other) == 200
        # The listener's connection goes, and the revocation comes before it is back: its
        # notification reaches no one.
        await admin.execute(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE application_name = 'llama-gate auth listener'
                 AND datname = current_database()"""
        )
        await accounts.revoke_key(admin, key.split("_")[1])
        await eventually(lambda: listener.connections == 2 and auth.stats.rechecks == 1)
        lookups = auth.stats.lookups
        assert await _status(client, proxy, key) == 401  # found by the re-check of every key
        assert await _status(client, proxy, other) == 200
        assert auth.stats.lookups == lookups  # both verdicts came from that one re-check
