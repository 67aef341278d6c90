"""A finished request leaves nothing for the garbage collector: its objects go by their reference
counts as it ends. Objects in reference cycles wait for a collection, which has to walk them all
first, while every stream waits; at c=32 one such cycle a request made full collections take
several milliseconds, a few times a second."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.pipeline.delivery import Delivery
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.outcome import Outcome
from tests.proxy_harness import bearer, running_proxy

PIPELINE_TYPES = (Exchange, Delivery, Outcome, web.BaseRequest)


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """What the collector finds unreachable from here on, kept in a list instead of freed."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_served_and_refused_requests_leave_no_cycles(
    db_dsn: str, tmp_path: Path, saved_garbage: list[object]
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy, aiohttp.ClientSession() as client:
        alice = await proxy.user("alice")
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        url = proxy.url("/v1/chat/completions")
        sent = [
            (chat, bearer(alice), 200),
            ({**chat, "stream": True}, bearer(alice), 200),
            (chat, bearer("lgk_0123456789abcdef_not-a-key"), 401),
            ({"messages": "not a list"}, bearer(alice), 400),
        ]
        for body, headers, status in sent:
            async with client.post(url, json=body, headers=headers) as response:
                await response.read()
                assert response.status == status
        async with client.post(
            proxy.url("/v1/messages"),
            json={"model": "smollm2-test", "max_tokens": 8, "messages": chat["messages"]},
            headers={"x-api-key": alice, "anthropic-version": "2023-06-01"},
        ) as response:
            await response.read()
            assert response.status == 200
        await proxy.wait_for_records(len(sent) + 1)
    gc.collect()
    left = [type(o).__name__ for o in saved_garbage if isinstance(o, PIPELINE_TYPES)]
    assert left == []
