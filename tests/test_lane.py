"""Large bodies' heavy steps take turns at the event loop; small ones never wait."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.lane import Lane
from proxy.limits.body import read_body


async def test_large_steps_take_turns_and_the_loop_runs_between_them() -> None:
    lane = Lane(large=100)
    order: list[str] = []
    ticks = 0

    async def ticker() -> None:  # another user's stream: ready again at every pass of the loop
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    def heavy(name: str) -> str:
        order.append(f"{name}@{ticks}")
        time.sleep(0.01)  # holds the loop, as parsing 8 MiB does
        return name

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    done = await asyncio.gather(*(lane.step(1000, lambda n=n: heavy(n)) for n in "abcd"))
    running.cancel()
    assert done == list("abcd")
    seen = [int(step.split("@")[1]) for step in order]
    # between any two heavy steps the ticker ran: no two ran back to back
    assert all(later > earlier for earlier, later in itertools.pairwise(seen)), order


async def test_a_small_body_never_waits_for_the_lane() -> None:
    lane = Lane(large=100)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with lane.turn(1000):
            entered.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await entered.wait()
    assert await asyncio.wait_for(lane.step(10, lambda: "small"), 1) == "small"
    waiting = asyncio.create_task(lane.step(1000, lambda: "large"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # a large one waits its turn
    release.set()
    assert await waiting == "large"
    await holder


async def test_a_large_body_in_pieces_is_put_together_at_its_turn() -> None:
    """Copying megabytes of pieces into one body holds the loop: it waits for the lane, as
    parsing does, and the body comes out whole."""
    lane = Lane(large=1000)
    entered, release = asyncio.Event(), asyncio.Event()
    bodies: list[bytes] = []

    async def hold() -> None:
        async with lane.turn(1000):
            entered.set()
            await release.wait()

    async def handler(request: web.Request) -> web.Response:
        bodies.append(await read_body(request, 1 << 20, 10.0, lambda _: None, lane))
        return web.Response()

    async def pieces() -> AsyncIterator[bytes]:
        for n in range(8):
            yield bytes([n]) * 4096
            await asyncio.sleep(0.01)  # so the server reads them as separate pieces

    app = web.Application()
    app.router.add_post("/", handler)
    holder = asyncio.create_task(hold())
    await entered.wait()
    async with TestServer(app) as server, aiohttp.ClientSession() as client:
        sending = asyncio.create_task(client.post(server.make_url("/"), data=pieces()))
        await asyncio.sleep(0.3)  # every piece has arrived by now
        assert bodies == []  # put together only at its turn
        assert not sending.done()
        release.set()
        async with await sending as response:
            assert response.status == 200
    await holder
    assert bodies == [b"".join(bytes([n]) * 4096 for n in range(8))]
