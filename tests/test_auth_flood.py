"""A flood of bad keys from one address does not starve good users."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp

from proxy.appkeys import AUTHENTICATOR
from proxy.auth.authenticator import FAILURE_LIMIT
from tests.proxy_harness import bearer, random_key, running_proxy

FLOOD_RATE = 150  # requests per second
FLOOD_SECONDS = 3.0


async def test_valid_users_are_served_promptly_during_a_flood_of_random_keys(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        victim = await proxy.user("victim")  # its key id is real: wrong secrets cost argon2
        victim_id = victim.split("_")[1]
        good = await proxy.user("alice")  # never used before the flood: not cached
        statuses: Counter[int] = Counter()

        async def one_bad(session: aiohttp.ClientSession, n: int) -> None:
            key = random_key()
            if n % 3 == 0:
                key = f"lgk_{victim_id}_{key.split('_', 2)[2]}"
            async with session.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
                statuses[r.status] += 1

        async def flood() -> float:
            # Another address, so the per-address failure limit is the attacker's alone.
            connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                started = time.monotonic()
                tasks = []
                for n in range(int(FLOOD_RATE * FLOOD_SECONDS)):
                    tasks.append(asyncio.create_task(one_bad(session, n)))
                    await asyncio.sleep(max(0.0, started + (n + 1) / FLOOD_RATE - time.monotonic()))
                sent_in = time.monotonic() - started
                await asyncio.gather(*tasks)
            return len(tasks) / sent_in

        async def good_user() -> list[float]:
            await asyncio.sleep(0.5)  # well into the flood
            latencies = []
            async with aiohttp.ClientSession() as session:
                for _ in range(10):
                    started = time.monotonic()
                    async with session.get(proxy.url("/v1/models"), headers=bearer(good)) as r:
                        assert r.status == 200, await r.text()
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.1)
            return latencies

        rate, latencies = await asyncio.gather(flood(), good_user())

    assert rate >= 100
    assert max(latencies) < 1.0, latencies
    assert set(statuses) <= {401, 429}
    assert statuses[429] > statuses[401]  # most of the flood was cut off at the door
    auth = proxy.app[AUTHENTICATOR]
    # Work done for the flood stays near the failure limit, not near the number of requests.
    assert auth.stats.lookups < 3 * FAILURE_LIMIT, auth.stats
    assert auth.stats.argon2 < 2 * FAILURE_LIMIT, auth.stats
