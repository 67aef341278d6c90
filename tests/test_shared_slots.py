"""Proxy processes on one database share the backends' slots, the fair order and the per-user cap.

The backend here is a real HTTP server that holds every chat request until the test lets it go,
and counts how many it holds at once: the one figure that must never pass its slots.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from proxy.appkeys import SHARED_SLOTS
from proxy.cluster.slots import LEASE_SECONDS, POLL_SECONDS
from proxy.db.localpg import free_port
from tests.listening import Listening
from tests.proxy_harness import (
    ROOT,
    Harness,
    bearer,
    make_user,
    proxy_environ,
    running_proxy,
)

ANSWER = {
    "id": "cmpl-held",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "held",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


@dataclass
class HeldBackend:
    """Chat requests arrive (their first message's text is noted) and wait to be let go."""

    port: int = field(default_factory=free_port)
    arrived: list[str] = field(default_factory=list)
    running: int = 0
    most: int = 0  # the most requests it ever held at once
    _go: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    _arrival: asyncio.Event = field(default_factory=asyncio.Event)
    _listening: Listening | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        self._listening = await Listening.start(app, self.port)

    async def stop(self) -> None:
        assert self._listening is not None
        await self._listening.stop()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": ["held"], "default": "held"})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.running += 1
        self.most = max(self.most, self.running)
        self.arrived.append(body["messages"][0]["content"])
        self._arrival.set()
        try:
            await self._go.get()
        finally:
            self.running -= 1
        return web.json_response(ANSWER)

    def let_one_go(self) -> None:
        self._go.put_nowait(None)

    async def arrivals(self, count: int, within: float = 10.0) -> list[str]:
        """The texts of the first `count` requests, once that many have arrived."""
        async with asyncio.timeout(within):
            while len(self.arrived) < count:
                self._arrival.clear()
                await self._arrival.wait()
        return self.arrived[:count]


@asynccontextmanager
async def held_backend() -> AsyncIterator[HeldBackend]:
    backend = HeldBackend()
    await backend.start()
    try:
        yield backend
    finally:
        for _ in range(64):
            backend.let_one_go()
        await backend.stop()


def _settings(backend: HeldBackend, **extra: str) -> dict[str, str]:
    return {"LLAMA_SERVER_URLS": f"http://127.0.0.1:{backend.port}", **extra}


@asynccontextmanager
async def two_shared_proxies(
    dsn: str, home: Path, backend: HeldBackend, **extra: str
) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two proxies in front of `backend`, as two of `serve --workers 2`: shared from the start."""
    settings = _settings(backend, LLAMA_PROXY_WORKERS="2", **extra)
    async with (
        running_proxy(dsn, home / "a", **settings) as first,
        running_proxy(dsn, home / "b", **settings) as second,
    ):
        yield first, second


async def _post(client: aiohttp.ClientSession, base: str, key: str, text: str) -> int:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key)) as r:
        await r.read()
        return r.status


async def _count(dsn: str, sql: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval(sql))
    finally:
        await con.close()


async def _until(condition: Any, within: float = 10.0) -> None:
    """Wait until `await condition()` holds (state in Postgres: nothing to wait on but asking)."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 - polling is the point
            await asyncio.sleep(0.02)


async def test_a_lone_process_keeps_its_slots_in_memory(db_dsn: str, tmp_path: Path) -> None:
    async with (
        held_backend() as backend,
        running_proxy(db_dsn, tmp_path, **_settings(backend)) as proxy,
    ):
        key = await proxy.user("alice")
        async with aiohttp.ClientSession() as client:
            task = asyncio.create_task(_post(client, proxy.url(""), key, "one"))
            await backend.arrivals(1)
            # Nothing is written for its slots while it is alone: no lease, no waiting row.
            assert await _count(db_dsn, "SELECT count(*) FROM llama_slot_leases") == 0
            assert await _count(db_dsn, "SELECT count(*) FROM llama_slot_waiters") == 0
            backend.let_one_go()
            assert await task == 200
        assert not proxy.app[SHARED_SLOTS].active


async def test_two_processes_never_exceed_a_backends_slots(db_dsn: str, tmp_path: Path) -> None:
    async with (
        held_backend() as backend,
        running_proxy(
            db_dsn, tmp_path / "a", **_settings(backend, LLAMA_PROXY_MAX_CONCURRENT="10")
        ) as first,
    ):
        alice = await first.user("alice")
        bob = await first.user("bob")
        async with aiohttp.ClientSession() as client:
            # alice's request runs in the first process while it is still alone ...
            early = asyncio.create_task(_post(client, first.url(""), alice, "alice early"))
            await backend.arrivals(1)
            async with running_proxy(
                db_dsn, tmp_path / "b", **_settings(backend, LLAMA_PROXY_MAX_CONCURRENT="10")
            ) as second:
                # ... and the second process finds the first at its start: both switch.
                await _until(lambda: _true(second.app[SHARED_SLOTS].active))
                await _until(lambda: _true(first.app[SHARED_SLOTS].active))
                calls = [
                    asyncio.create_task(_post(client, proxy.url(""), key, f"{name} {n}"))
                    for n in range(3)
                    for proxy, key, name in ((first, alice, "alice"), (second, bob, "bob"))
                ]
                await asyncio.sleep(1.5)
                # The request running from before the switch is counted: nothing else ran.
                assert backend.arrived == ["alice early"]
                for served in range(1, 8):
                    backend.let_one_go()
                    await backend.arrivals(min(served + 1, 7))
                assert await early == 200
                assert await asyncio.gather(*calls) == [200] * 6
    assert backend.most == 1
    assert sorted(backend.arrived[1:]) == sorted(
        f"{u} {n}" for u in ("alice", "bob") for n in (0, 1, 2)
    )


async def _true(value: bool) -> bool:
    return value


async def test_a_freed_slot_goes_to_the_user_served_least_recently_across_processes(
    db_dsn: str, tmp_path: Path
) -> None:
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend, LLAMA_PROXY_MAX_CONCURRENT="10") as (
            first,
            second,
        ),
    ):
        flood = await first.user("flood")
        other = await second.user("other")
        async with aiohttp.ClientSession() as client:
            floods = [
                asyncio.create_task(_post(client, first.url(""), flood, f"flood {n}"))
                for n in range(5)
            ]
            await backend.arrivals(1)
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 4))
            # The other user asks through the other process, behind four waiting floods.
            mine = asyncio.create_task(_post(client, second.url(""), other, "other"))
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 5))
            backend.let_one_go()
            # Next comes the other user's request: it waited for the one running, no more.
            assert (await backend.arrivals(2))[1] == "other"
            for _ in range(5):
                backend.let_one_go()
            assert await mine == 200
            assert await asyncio.gather(*floods) == [200] * 5
        # The grant reached the second process by NOTIFY, not by its poll.
        assert second.app[SHARED_SLOTS].grants_heard >= 1
    assert backend.most == 1
    assert await _count(db_dsn, "SELECT count(*) FROM llama_slot_leases") == 0


async def _at_least(dsn: str, sql: str, count: int) -> bool:
    return await _count(dsn, sql) >= count


async def test_the_per_user_cap_holds_across_processes(db_dsn: str, tmp_path: Path) -> None:
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend, LLAMA_PROXY_MAX_CONCURRENT="2") as (
            first,
            second,
        ),
    ):
        key = await first.user("alice")
        async with aiohttp.ClientSession() as client:
            held = [
                asyncio.create_task(_post(client, first.url(""), key, f"alice {n}"))
                for n in range(2)
            ]
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 1))
            # Each process alone would let a third in (its own count is 0 and 2 of 2): not so.
            assert await _post(client, second.url(""), key, "alice 2") == 429
            for _ in range(2):
                backend.let_one_go()
            assert await asyncio.gather(*held) == [200, 200]
            # With both ended, the other process lets her in again.
            again = asyncio.create_task(_post(client, second.url(""), key, "alice 3"))
            await backend.arrivals(3)
            backend.let_one_go()
            assert await again == 200
    assert backend.arrived == ["alice 0", "alice 1", "alice 3"] or backend.arrived == [
        "alice 1",
        "alice 0",
        "alice 3",
    ]


@asynccontextmanager
async def proxy_process(environ: dict[str, str], *args: str) -> AsyncIterator[tuple[str, Any]]:
    """`python -m proxy` as a real process (started without blocking the test's loop, where
    the backend runs): its base URL and the process, once /health answers."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port), *args,
        cwd=ROOT, env={**os.environ, **environ},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client, asyncio.timeout(30):
            while True:
                assert process.returncode is None, "the proxy exited"
                try:
                    async with client.get(f"{base}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield base, process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_a_killed_proxys_slot_comes_back_within_the_lease(
    db_dsn: str, tmp_path: Path
) -> None:
    async with held_backend() as backend:
        environ = proxy_environ(db_dsn, backend.port, tmp_path, **_settings(backend))
        _, alice = await make_user(db_dsn, "alice")
        _, bob = await make_user(db_dsn, "bob")
        async with (
            proxy_process(environ) as (first, doomed),
            proxy_process(environ) as (
                second,
                _,
            ),
            aiohttp.ClientSession() as client,
        ):
            # Two proxies started apart find each other through their presence rows.
            sql = "SELECT count(*) FROM llama_proxies WHERE shared"
            await _until(lambda: _at_least(db_dsn, sql, 2))
            holding = asyncio.create_task(_post(client, first, alice, "holds the slot"))
            await backend.arrivals(1)
            waiting = asyncio.create_task(_post(client, second, bob, "waits"))
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 1))
            doomed.send_signal(signal.SIGKILL)  # holding its lease, never to give it back
            killed = time.monotonic()
            await doomed.wait()
            # The backend still works on the dead proxy's request: let it end, as a real
            # model server would once its client is gone.
            await asyncio.sleep(0.5)
            backend.let_one_go()
            await backend.arrivals(2, within=LEASE_SECONDS + 3 * POLL_SECONDS + 5)
            served_after = time.monotonic() - killed
            backend.let_one_go()
            assert await waiting == 200
            with pytest.raises(aiohttp.ClientError):
                await holding
            # No slot lost: the next requests are served one at a time, at once.
            for n in range(3):
                call = asyncio.create_task(_post(client, second, bob, f"after {n}"))
                await backend.arrivals(3 + n, within=5)
                backend.let_one_go()
                assert await call == 200
    assert served_after <= LEASE_SECONDS + 2 * POLL_SECONDS + 1
    assert backend.most == 1
    assert await _count(db_dsn, "SELECT count(*) FROM llama_slot_leases") == 0


async def test_serve_workers_runs_that_many_shared_processes(db_dsn: str, tmp_path: Path) -> None:
    async with held_backend() as backend:
        metrics, dashboard = free_port(), free_port()
        environ = proxy_environ(
            db_dsn, backend.port, tmp_path,
            **_settings(backend, LLAMA_PROXY_MAX_CONCURRENT="10"),
            LLAMA_PROXY_METRICS_PORT=str(metrics), LLAMA_PROXY_DASHBOARD_PORT=str(dashboard),
        )  # fmt: skip
        _, alice = await make_user(db_dsn, "alice")
        async with proxy_process(environ, "--workers", "2") as (base, parent):
            sql = "SELECT count(*) FROM llama_proxies WHERE shared"
            await _until(lambda: _at_least(db_dsn, sql, 2))
            pids = await _pids(db_dsn)
            assert parent.pid not in pids
            assert len(pids) == 2
            async with aiohttp.ClientSession() as client:
                # One of them serves the dashboard and /metrics (each port is one listener's).
                for url in (f"http://127.0.0.1:{metrics}/metrics",
                            f"http://127.0.0.1:{dashboard}/login"):  # fmt: skip
                    async with client.get(url) as r:
                        assert r.status == 200, url
                calls = [asyncio.create_task(_post(client, base, alice, f"{n}")) for n in range(4)]
                for n in range(4):
                    await backend.arrivals(n + 1)
                    backend.let_one_go()
                assert await asyncio.gather(*calls) == [200] * 4
            parent.terminate()
            assert await asyncio.wait_for(parent.wait(), 20) == 0
        # The workers stopped with it, and left nothing behind.
        assert await _count(db_dsn, "SELECT count(*) FROM llama_proxies") == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    assert backend.most == 1


async def _pids(dsn: str) -> list[int]:
    con = await asyncpg.connect(dsn)
    try:
        return [row["pid"] for row in await con.fetch("SELECT pid FROM llama_proxies")]
    finally:
        await con.close()


async def _chat(client: aiohttp.ClientSession, base: str, key: str, messages: list[Any]) -> int:
    body = {"messages": messages, "max_tokens": 1}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key)) as r:
        await r.read()
        return r.status


async def test_a_conversation_goes_where_it_is_warm_through_either_process(
    db_dsn: str, tmp_path: Path
) -> None:
    async with held_backend() as one, held_backend() as two:
        urls = f"http://127.0.0.1:{one.port},http://127.0.0.1:{two.port}"
        extra = {"LLAMA_SERVER_URLS": urls, "LLAMA_PROXY_WORKERS": "2"}
        async with (
            running_proxy(db_dsn, tmp_path / "a", **extra) as first,
            running_proxy(db_dsn, tmp_path / "b", **extra) as second,
        ):
            alice, bob = await first.user("alice"), await first.user("bob")
            turn = [{"role": "user", "content": "a conversation"}]
            async with aiohttp.ClientSession() as client:
                # bob keeps the first backend busy, so alice's first turn goes to the second.
                busy = asyncio.create_task(_post(client, first.url(""), bob, "busy"))
                await one.arrivals(1)
                started = asyncio.create_task(_chat(client, first.url(""), alice, turn))
                await two.arrivals(1)
                two.let_one_go()
                assert await started == 200
                one.let_one_go()
                assert await busy == 200
                # Both are free now. Her next turn comes through the other process, which never
                # served her: it still goes where her conversation is warm.
                turn += [
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "and then?"},
                ]
                follow = asyncio.create_task(_chat(client, second.url(""), alice, turn))
                await two.arrivals(2)
                two.let_one_go()
                assert await follow == 200
    assert one.arrived == ["busy"]
    assert two.arrived == ["a conversation", "a conversation"]


async def _execute(dsn: str, sql: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(sql)
    finally:
        await con.close()


async def test_after_postgres_forgets_the_slots_nothing_runs_beside_what_ran(
    db_dsn: str, tmp_path: Path
) -> None:
    """A crash of Postgres empties the UNLOGGED slot tables (here: TRUNCATE, the same effect):
    the running request's lease is written back, the waiting one queues again, and it runs
    only once the slot is free."""
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend) as (first, second),
    ):
        alice, bob = await first.user("alice"), await first.user("bob")
        async with aiohttp.ClientSession() as client:
            running = asyncio.create_task(_post(client, first.url(""), alice, "running"))
            await backend.arrivals(1)
            waiting = asyncio.create_task(_post(client, second.url(""), bob, "waiting"))
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 1))
            await _execute(
                db_dsn,
                "TRUNCATE llama_slot_epoch, llama_slot_backends, llama_slot_leases, "
                "llama_slot_waiters, llama_slot_turns, llama_slot_conversations",
            )
            # Written back by the first process's next renewal, and queued again by the second.
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_leases", 1))
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 1))
            await asyncio.sleep(4)  # past the new epoch's wait: still not granted beside it
            assert backend.arrived == ["running"]
            backend.let_one_go()
            assert await running == 200
            await backend.arrivals(2)
            backend.let_one_go()
            assert await waiting == 200
    assert backend.most == 1


async def test_clients_that_leave_leave_no_lease_or_place_behind(
    db_dsn: str, tmp_path: Path
) -> None:
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend, LLAMA_PROXY_MAX_CONCURRENT="20") as (
            first,
            second,
        ),
    ):
        alice = await first.user("alice")
        async with aiohttp.ClientSession() as client:
            held = asyncio.create_task(_post(client, first.url(""), alice, "held"))
            await backend.arrivals(1)
            # Clients give up at every moment: before their ask is sent, while its batch is out,
            # while they wait for a grant.
            leaving = [
                asyncio.create_task(
                    asyncio.wait_for(
                        _post(client, proxy.url(""), alice, f"leaves {n}"), 0.002 * n + 0.001
                    )
                )
                for n in range(20)
                for proxy in (first, second)
            ]
            results = await asyncio.gather(*leaving, return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results
            # Their proxies hear them leave and give their places back: none is left waiting.
            await _until(lambda: _none(db_dsn, "SELECT count(*) FROM llama_slot_waiters"))
            backend.let_one_go()
            assert await held == 200
            # Nothing is left: the next request runs at once, and the tables are empty after.
            after = asyncio.create_task(_post(client, second.url(""), alice, "after"))
            await backend.arrivals(2, within=3)
            backend.let_one_go()
            assert await after == 200
            for table in ("llama_slot_leases", "llama_slot_waiters"):
                await _until(lambda t=table: _none(db_dsn, f"SELECT count(*) FROM {t}"))
    assert backend.arrived == ["held", "after"]


async def _none(dsn: str, sql: str) -> bool:
    return await _count(dsn, sql) == 0


async def test_a_worker_that_dies_is_replaced_and_all_stop_with_the_parent(
    db_dsn: str, tmp_path: Path
) -> None:
    async with held_backend() as backend:
        environ = proxy_environ(db_dsn, backend.port, tmp_path, **_settings(backend))
        async with proxy_process(environ, "--workers", "2") as (_, parent):
            sql = "SELECT count(*) FROM llama_proxies WHERE shared"
            await _until(lambda: _at_least(db_dsn, sql, 2))
            first_pids = await _pids(db_dsn)
            os.kill(first_pids[0], signal.SIGKILL)
            # Its row goes stale; a new worker beats beside the survivor.
            await _until(lambda: _replaced(db_dsn, first_pids), within=20)
            pids = [pid for pid in await _pids(db_dsn) if pid != first_pids[0]]
            parent.terminate()
            assert await asyncio.wait_for(parent.wait(), 30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def _replaced(dsn: str, before: list[int]) -> bool:
    now = await _pids(dsn)
    return any(pid not in before for pid in now)


async def test_workers_stop_when_their_parent_is_killed(db_dsn: str, tmp_path: Path) -> None:
    async with held_backend() as backend:
        environ = proxy_environ(db_dsn, backend.port, tmp_path, **_settings(backend))
        async with proxy_process(environ, "--workers", "2") as (_, parent):
            sql = "SELECT count(*) FROM llama_proxies WHERE shared"
            await _until(lambda: _at_least(db_dsn, sql, 2))
            pids = await _pids(db_dsn)
            parent.kill()  # SIGKILL: it cannot stop them itself
            await parent.wait()
            await _until(lambda: _true(not any(_alive(pid) for pid in pids)), within=40)
    assert await _count(db_dsn, "SELECT count(*) FROM llama_proxies") == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
