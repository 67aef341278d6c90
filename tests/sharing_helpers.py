"""What the fair-sharing tests share: per-user limits in the database, polling, one chat call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg

from proxy.db import accounts
from tests.proxy_harness import bearer


async def set_limits(dsn: str, username: str, **limits: int | None) -> None:
    """Set a user's overrides (`max_concurrent`, `tokens_per_day`, ...) as `set-limit` does."""
    con = await asyncpg.connect(dsn)
    try:
        assert await accounts.set_user_limits(con, username, limits) is not None
    finally:
        await con.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait for `condition` to hold, checking every few milliseconds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {condition}")
        await asyncio.sleep(0.005)


async def chat(
    client: aiohttp.ClientSession, url: str, key: str, user: str, **fields: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST one chat completion to `url` naming `user`; its status, JSON body (a stream's
    text under "stream") and headers."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "user": user, **fields}
    async with client.post(url, json=body, headers=bearer(key)) as r:
        if r.content_type == "text/event-stream":
            return r.status, {"stream": await r.text()}, dict(r.headers)
        return r.status, await r.json(), dict(r.headers)
