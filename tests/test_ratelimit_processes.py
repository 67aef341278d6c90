"""Two real proxy processes on one database share each user's window exactly."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, bearer, make_user, proxy_environ, proxy_process

LIMIT = 10


async def test_two_processes_admit_exactly_the_limit_between_them(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY)
    await upstream.start()
    try:
        _, key = await make_user(db_dsn, "alice", rate_limit=LIMIT, rate_window_seconds=60)
        # The burst is one user's: lift the per-user concurrency cap, so only the shared
        # rate window decides.
        environ = proxy_environ(db_dsn, upstream.port, tmp_path, LLAMA_PROXY_MAX_CONCURRENT="100")
        with proxy_process(environ) as first, proxy_process(environ) as second:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

                async def call(base: str) -> tuple[str, int]:
                    async with client.get(f"{base}/v1/models", headers=bearer(key)) as r:
                        await r.read()
                        return base, r.status

                # Verify the key in both processes first (a malformed body spends no quota), so
                # the burst below meets in the shared window rather than behind one argon2.
                for base in (first, second):
                    url = f"{base}/v1/chat/completions"
                    async with client.post(url, data=b"{", headers=bearer(key)) as r:
                        assert r.status == 400
                results = await asyncio.gather(
                    *(call(base) for _ in range(3 * LIMIT // 2) for base in (first, second))
                )
    finally:
        await upstream.stop()
    statuses = Counter(status for _, status in results)
    assert statuses == {200: LIMIT, 429: 2 * LIMIT}
    assert len(upstream.seen) == LIMIT
    assert {base for base, _ in results} == {first, second}
