"""While Postgres is down: recently verified keys keep working, unknown keys get 503 (not 401),
limits stay enforced per process, and the proxy recovers by itself when Postgres returns."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.appkeys import AUTH_LISTENER
from proxy.db import accounts
from proxy.db.localpg import LocalPostgres
from tests.proxy_harness import Harness, bearer, make_user, running_proxy


async def _call(client: aiohttp.ClientSession, proxy: Harness, key: str) -> aiohttp.ClientResponse:
    async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as response:
        await response.read()
        return response


async def test_postgres_outage_and_recovery(
    own_postgres: LocalPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy")
    _, alice = await make_user(own_postgres.dsn, "alice", rate_limit=3, rate_window_seconds=60)
    _, bob = await make_user(own_postgres.dsn, "bob")
    settings = {"LLAMA_PROXY_AUTH_CACHE_SECONDS": "1"}
    async with (
        running_proxy(own_postgres.dsn, tmp_path, **settings) as proxy,
        aiohttp.ClientSession() as client,
    ):
        verified_at = time.monotonic()
        first = await _call(client, proxy, alice)
        assert first.status == 200
        assert first.headers["x-ratelimit-remaining-requests"] == "2"

        await asyncio.to_thread(own_postgres.stop)
        await asyncio.sleep(max(0.0, verified_at + 1.2 - time.monotonic()))  # past the TTL

        # A key verified recently keeps working, and the limit still holds: the admission
        # made while Postgres was up counts in the process's own window.
        statuses = [(await _call(client, proxy, alice)).status for _ in range(3)]
        assert statuses == [200, 200, 429]

        unknown = await _call(client, proxy, bob)
        assert unknown.status == 503
        async with client.get(proxy.url("/v1/models"), headers=bearer(bob)) as r:
            body = await r.json()
        assert body["error"]["code"] == "key_store_unavailable"
        async with client.get(proxy.url("/ready")) as r:
            assert r.status == 503
            assert (await r.json())["status"] == "not ready: database"

        await asyncio.to_thread(own_postgres.start, True)
        started = time.monotonic()
        while (await _call(client, proxy, bob)).status != 200:
            assert time.monotonic() - started < 15, "the proxy did not recover"
            await asyncio.sleep(0.2)
        async with asyncio.timeout(15):
            while not proxy.app[AUTH_LISTENER].connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        async with client.get(proxy.url("/ready")) as r:
            assert r.status == 200

    outage_logs = [r.getMessage() for r in caplog.records if r.name == "proxy.db.pool"]
    assert sum("is unreachable" in m for m in outage_logs) == 1, outage_logs
    assert sum("reachable again" in m for m in outage_logs) == 1, outage_logs
    per_process = [r for r in caplog.records if r.name == "proxy.limits.ratelimit"]
    assert len(per_process) == 1


async def test_a_revocation_right_after_postgres_restarts_takes_effect_within_a_second(
    own_postgres: LocalPostgres, tmp_path: Path
) -> None:
    _, alice = await make_user(own_postgres.dsn, "alice")
    # A long cache TTL: only the listener (or its re-check of every key) can explain a refusal.
    settings = {"LLAMA_PROXY_AUTH_CACHE_SECONDS": "300"}
    async with (
        running_proxy(own_postgres.dsn, tmp_path, **settings) as proxy,
        aiohttp.ClientSession() as client,
    ):
        assert (await _call(client, proxy, alice)).status == 200
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.sleep(3)  # long enough for an unbounded reconnect backoff to grow
        assert (await _call(client, proxy, alice)).status == 200  # cached: served meanwhile
        await asyncio.to_thread(own_postgres.start, True)
        admin = await asyncpg.connect(own_postgres.dsn)
        try:
            await accounts.revoke_key(admin, alice.split("_")[1])
        finally:
            await admin.close()
        revoked = time.monotonic()
        while (await _call(client, proxy, alice)).status != 401:
            assert time.monotonic() - revoked < 5, "the revocation never reached the proxy"
            await asyncio.sleep(0.02)
        assert time.monotonic() - revoked < 1.0
