"""Floods of bad keys slow no one: cached users never queue behind them, a new valid key is
verified within a second, and a valid key from the flood's own address still gets through."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from proxy.appkeys import AUTHENTICATOR
from proxy.auth.authenticator import FAILURE_LIMIT
from tests.proxy_harness import Harness, bearer, random_key, running_proxy

FLOOD_RATE = 144  # bad keys a second
FLOOD_SECONDS = 3.0
ADDRESSES = [f"127.0.1.{n}" for n in range(1, 51)]  # all of 127/8 is this machine


async def _flood(
    proxy: Harness, addresses: list[str], victims: list[str], statuses: Counter[int]
) -> float:
    """Bad keys at FLOOD_RATE, spread over `addresses`; every third has the key id of one of
    `victims` (a real key id with a wrong secret costs argon2), the rest random key ids.
    Returns the rate actually sent."""
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=0))
        for address in addresses
    ]

    async def one(number: int) -> None:
        key = random_key()
        if number % 3 == 0:
            victim_id = victims[number % len(victims)].split("_")[1]
            key = f"lgk_{victim_id}_{key.split('_', 2)[2]}"
        session = sessions[number % len(sessions)]
        async with session.get(proxy.url("/v1/models"), headers=bearer(key)) as response:
            statuses[response.status] += 1

    try:
        started = time.monotonic()
        tasks = []
        for number in range(int(FLOOD_RATE * FLOOD_SECONDS)):
            tasks.append(asyncio.create_task(one(number)))
            await asyncio.sleep(max(0.0, started + (number + 1) / FLOOD_RATE - time.monotonic()))
        sent_in = time.monotonic() - started
        await asyncio.gather(*tasks)
    finally:
        for session in sessions:
            await session.close()
    return len(tasks) / sent_in


async def _timed(call: Callable[[], Awaitable[int]]) -> tuple[int, float]:
    started = time.monotonic()
    status = await call()
    return status, time.monotonic() - started


async def test_a_flood_from_fifty_addresses_slows_no_cached_user_and_no_new_key(
    db_dsn: str, tmp_path: Path
) -> None:
    # A one-second cache: cached users need re-checks during the flood, which is what used to
    # queue behind it.
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_AUTH_CACHE_SECONDS="1") as proxy:
        victims = [await proxy.user(f"victim{n}") for n in range(3)]
        cached = await proxy.user("carol")
        newcomer = await proxy.user("alice")  # first used well into the flood
        statuses: Counter[int] = Counter()

        async with aiohttp.ClientSession() as client:

            async def get(key: str) -> int:
                async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
                    return r.status

            assert await get(cached) == 200

            async def cached_user() -> list[float]:
                latencies = []
                for _ in range(25):
                    status, took = await _timed(lambda: get(cached))
                    assert status == 200
                    latencies.append(took)
                    await asyncio.sleep(0.1)
                return latencies

            async def new_user() -> float:
                await asyncio.sleep(1.0)
                status, took = await _timed(lambda: get(newcomer))
                assert status == 200
                return took

            rate, latencies, first_use = await asyncio.gather(
                _flood(proxy, ADDRESSES, victims, statuses), cached_user(), new_user()
            )

    auth = proxy.app[AUTHENTICATOR]
    assert rate >= 0.9 * FLOOD_RATE
    assert set(statuses) <= {401, 429}
    assert auth.stats.argon2 > 50  # the flood did cost argon2: it was a real one
    assert auth.stats.known_lookups >= 2  # carol's key was re-checked during the flood...
    assert auth.stats.known_waits == 0  # ... never behind anything
    assert max(latencies) < 0.5, latencies
    assert first_use < 1.0


async def test_a_valid_new_key_gets_through_from_the_address_a_flood_comes_from(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        victim = await proxy.user("victim")
        newcomer = await proxy.user("alice")  # in the same NATed office as the flood
        statuses: Counter[int] = Counter()
        office = "127.0.0.2"
        connector = aiohttp.TCPConnector(local_addr=(office, 0))
        async with aiohttp.ClientSession(connector=connector) as client:

            async def colleague() -> list[tuple[int, float]]:
                await asyncio.sleep(1.0)  # the office address is far past its failure limit now
                answers = []
                for _ in range(5):

                    async def get() -> int:
                        async with client.get(
                            proxy.url("/v1/models"), headers=bearer(newcomer)
                        ) as r:
                            return r.status

                    answers.append(await _timed(get))
                    await asyncio.sleep(0.2)
                return answers

            _, answers = await asyncio.gather(
                _flood(proxy, [office], [victim], statuses), colleague()
            )

    auth = proxy.app[AUTHENTICATOR]
    assert statuses[401] + statuses[429] > 20 * FAILURE_LIMIT
    assert auth.stats.single_file > 0  # the flood's keys were checked one at a time
    assert [status for status, _ in answers] == [200] * 5
    assert answers[0][1] < 1.0  # the first use: a lookup and a hash, in the flood's midst
