"""A conversation's next turn goes to the backend that served its last one, unless that backend
is much busier than another (`AFFINITY_SLACK` requests per slot more, running or waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.appkeys import AUTH_LISTENER, BACKENDS, COMPLETION_HOOKS
from proxy.audit.row import AuditRow
from proxy.pipeline.outcome import Outcome
from proxy.settings import Secret
from proxy.upstream.affinity import conversation
from proxy.upstream.backends import AFFINITY_SLACK, Backends, Upstream
from tests.proxy_harness import BACKEND_KEY, bearer, make_user, proxy_settings
from tests.timed_upstream import TimedUpstream

SYSTEM = {"role": "system", "content": "Be brief."}


def _turns(name: str, count: int) -> list[list[dict[str, str]]]:
    """The message lists a client sends for each of `count` turns of one conversation."""
    messages: list[dict[str, str]] = [SYSTEM]
    turns = []
    for turn in range(count):
        messages = [*messages, {"role": "user", "content": f"{name} asks #{turn}"}]
        turns.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"answer #{turn}"}]
    return turns


def test_the_next_turn_names_this_turn_as_the_conversation_it_continues() -> None:
    first, second, third = (conversation("m", turn) for turn in _turns("ann", 3))
    assert first is not None and second is not None and third is not None  # noqa: PT018
    assert first.key in second.prefixes
    assert second.key == third.prefixes[1]  # its latest turn, after the assistant's answer
    assert first.key in third.prefixes
    assert second.key not in first.prefixes
    # Another model, other tools, or another conversation: nothing in common past the start.
    assert conversation("other", _turns("ann", 2)[1]).key != second.key  # type: ignore[union-attr]
    assert conversation(["m", [{"tool": 1}]], _turns("ann", 2)[1]).key != second.key  # type: ignore[union-attr]
    assert first.key not in conversation("m", _turns("bob", 2)[1]).prefixes  # type: ignore[union-attr]
    assert conversation("m", None) is None
    assert conversation("m", []) is None
    assert conversation("m", "not a list") is None


def _backends(*names: str) -> Backends:
    return Backends([Upstream(name, "127.0.0.1", 9, Secret("k")) for name in names])


async def test_a_conversation_waits_for_its_backend_until_that_one_is_much_busier() -> None:
    assert AFFINITY_SLACK == 2  # the figures below are this rule's
    backends = _backends("p", "q")
    x1, x2 = (conversation("m", turn) for turn in _turns("x", 2))
    y1, y2 = (conversation("m", turn) for turn in _turns("y", 2))
    for first in (x1, y1):  # both conversations start on p (the first of two idle backends)
        async with backends.acquire("u", None, Outcome(), affinity=first) as upstream:
            assert upstream.name == "p"
    async with AsyncExitStack() as held:
        other = await held.enter_async_context(backends.acquire("z", None, Outcome()))
        assert other.name == "p"  # p is busy now, q idle

        async def turn(user: str, affinity: Any) -> str:
            async with backends.acquire(user, None, Outcome(), affinity=affinity) as upstream:
                await asyncio.sleep(0.05)
                return upstream.name

        x = asyncio.create_task(turn("x", x2))
        await asyncio.sleep(0.05)
        # One request ahead on p is not "much busier": x waits for p, q stays idle.
        assert not x.done()
        assert backends.in_flight("q") == 0
        # y too prefers p, where one runs and x waits: two more than q, so y goes to q.
        assert await turn("y", y2) == "q"
        assert not x.done()
    assert await x == "p"  # p's slot went to x as soon as it was free
    # The conversation moved with y: its next turn prefers q.
    y3 = conversation("m", _turns("y", 3)[2])
    async with backends.acquire("y", None, Outcome(), affinity=y3) as upstream:
        assert upstream.name == "q"


async def test_a_conversation_whose_backend_is_out_goes_elsewhere_at_once() -> None:
    backends = _backends("p", "q")
    x1, x2 = (conversation("m", turn) for turn in _turns("x", 2))
    async with backends.acquire("x", None, Outcome(), affinity=x1) as upstream:
        assert upstream.name == "p"
    async with AsyncExitStack() as held:
        await held.enter_async_context(backends.acquire("z", None, Outcome()))  # p busy
        waiting = asyncio.create_task(held.enter_async_context(
            backends.acquire("x", None, Outcome(), affinity=x2)
        ))  # fmt: skip
        await asyncio.sleep(0.02)
        assert not waiting.done()
        backends.refused(Upstream("p", "127.0.0.1", 9, Secret("k")), "test")
        assert (await asyncio.wait_for(waiting, 1)).name == "q"


@pytest.fixture
async def two_backends() -> AsyncIterator[tuple[TimedUpstream, TimedUpstream]]:
    first = TimedUpstream(service_time=0.05, models=("smollm2-test",))
    second = TimedUpstream(service_time=0.05, models=("smollm2-test",))
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_through_the_proxy_each_conversation_stays_on_one_backend_and_rows_say_which(
    db_dsn: str, tmp_path: Path, two_backends: tuple[TimedUpstream, TimedUpstream], api: str
) -> None:
    """Whichever API the client speaks: the backend call is what names the conversation."""
    ports = [upstream.port for upstream in two_backends]
    urls = ",".join(f"http://127.0.0.1:{port}" for port in ports)
    app = create_app(proxy_settings(db_dsn, 9, tmp_path, LLAMA_SERVER_URLS=urls))
    upstreams = [Upstream.from_url(f"http://127.0.0.1:{p}", Secret(BACKEND_KEY)) for p in ports]
    app[BACKENDS] = backends = Backends(upstreams, probe_interval=3600)
    records: list[AuditRow] = []
    app[COMPLETION_HOOKS].append(records.append)
    names = ["ann", "bob", "cid", "dee"]
    conversations = {name: _turns(name, 3) for name in names}
    async with TestServer(app) as server, aiohttp.ClientSession() as client:
        await asyncio.wait_for(app[AUTH_LISTENER].connected.wait(), 10)
        await backends.prober.probe(5.0)
        _, key = await make_user(db_dsn, "alice")
        path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
        url = str(server.make_url(path))

        async def send(name: str, turn: int) -> None:
            messages, user = conversations[name][turn], f"{name}#{turn}"
            body: dict[str, Any] = {"messages": messages, "user": user}
            if api == "anthropic":  # the same conversation in Anthropic's words
                system, *rest = messages
                body = {"model": "smollm2-test", "max_tokens": 5, "system": system["content"],
                        "messages": rest, "metadata": {"user_id": user}}  # fmt: skip
            async with client.post(url, json=body, headers=bearer(key)) as r:
                assert r.status == 200, await r.text()

        for turn in range(3):  # all four at once: two start on each backend, then stay there
            # In another order each turn, so that without affinity they would change places.
            order = names[turn:] + names[:turn]
            await asyncio.gather(*(send(name, turn) for name in order))
    where: dict[str, set[str | None]] = {}
    for upstream, port in zip(two_backends, ports, strict=True):
        for served in upstream.served:
            name = str(served.user).split("#")[0]
            where.setdefault(name, set()).add(f"127.0.0.1:{port}")
    assert all(len(backends_used) == 1 for backends_used in where.values()), where
    assert len({next(iter(b)) for b in where.values()}) == 2  # both backends took conversations
    assert sorted(str(row.backend) for row in records) == sorted(
        next(iter(where[name])) for name in names for _ in range(3)
    )
