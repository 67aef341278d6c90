"""`/health` answers whenever the process runs; `/ready` names what is missing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from proxy.db.localpg import free_port
from tests.fake_upstream import MODEL
from tests.proxy_harness import bearer, running_proxy


def _nowhere() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/llama_gate"


async def _get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return response.status, await response.json()


async def test_health_needs_no_key_no_database_and_no_backend(tmp_path: Path) -> None:
    async with running_proxy(_nowhere(), tmp_path, listening=False) as proxy:
        await proxy.upstream.stop()
        assert await _get(proxy.url("/health")) == (200, {"status": "ok"})
    assert proxy.records == []  # probes are not API requests


async def test_ready_when_database_and_backend_answer_without_calling_the_backend_api(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        status, body = await _get(proxy.url("/ready"))
    assert status == 200
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "backend": "ok"}
    assert proxy.upstream.seen == []  # only /health, which never waits for the model lock
    assert proxy.upstream.health_checks >= 1
    assert proxy.records == []


async def test_not_ready_names_the_database_when_postgres_is_unreachable(tmp_path: Path) -> None:
    async with running_proxy(_nowhere(), tmp_path, listening=False) as proxy:
        status, body = await _get(proxy.url("/ready"))
    assert status == 503
    assert body["status"] == "not ready: database"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert "Postgres is unreachable" in checks["database"]
    assert checks["backend"] == "ok"


async def test_not_ready_names_the_backend_when_it_is_down(db_dsn: str, tmp_path: Path) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        await proxy.upstream.stop()
        status, body = await _get(proxy.url("/ready"))
    assert status == 503
    assert body["status"] == "not ready: backend"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["database"] == "ok"
    assert str(checks["backend"]).startswith("not reachable")


async def test_ready_from_the_network_says_only_what_the_last_probe_found(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_TRUSTED_PROXIES="127.0.0.1") as proxy:
        checks = proxy.upstream.health_checks
        headers = {"X-Forwarded-For": "203.0.113.5"}  # a client on the network
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                async with client.get(proxy.url("/ready"), headers=headers) as r:
                    assert (r.status, await r.json()) == (200, {"status": "ready"})
        # Twenty asks cost the backend nothing: at most the regular probe ran meanwhile.
        assert proxy.upstream.health_checks - checks <= 1


async def test_ready_never_fails_requests_waiting_for_their_turn(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_TRUSTED_PROXIES="127.0.0.1") as proxy:
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        upstream = proxy.upstream
        upstream.gate = asyncio.Event()  # alice's stream holds the one slot
        chat = proxy.url("/v1/chat/completions")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async with aiohttp.ClientSession() as client:
            holder = await client.post(chat, json=body, headers=bearer(alice))
            await holder.content.readany()
            waiting = asyncio.create_task(client.post(chat, json=body, headers=bearer(bob)))
            await asyncio.sleep(0.2)
            upstream.healthy = False  # the backend says it is not ready (it is reloading)
            for forwarded in ({}, {"X-Forwarded-For": "203.0.113.5"}):
                async with client.get(proxy.url("/ready"), headers=forwarded) as r:
                    await r.read()
            await asyncio.sleep(2.5)  # and the regular probe has seen it too
            assert not waiting.done()  # bob still waits: the backend served, it may come back
            upstream.healthy = True
            upstream.gate.set()
            holder.close()
            answer = await asyncio.wait_for(waiting, 10)
            assert answer.status == 200
            assert (await answer.read()).endswith(b"data: [DONE]\r\n\r\n")
