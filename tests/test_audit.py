"""The audit log: exactly one llama_requests row per request, written off the request path, and
none lost to a Postgres outage, a spill and replay, or a SIGTERM under load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.audit.row import AuditRow
from proxy.audit.writer import AuditWriter
from proxy.db.localpg import LocalPostgres, free_port
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import (
    BACKEND_KEY,
    ROOT,
    Harness,
    bearer,
    make_user,
    proxy_environ,
    running_proxy,
    wait_for_health,
)

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


async def _rows(dsn: str, expected: int, within: float = 10.0) -> list[asyncpg.Record]:
    """The audit rows once there are `expected` of them (or all there are after `within` s)."""
    deadline = time.monotonic() + within
    while True:
        con = await asyncpg.connect(dsn)
        try:
            rows = await con.fetch("SELECT * FROM llama_requests ORDER BY id")
        finally:
            await con.close()
        if len(rows) >= expected or time.monotonic() > deadline:
            await asyncio.sleep(0.3)  # a straggler would show up now: exactly means exactly
            con = await asyncpg.connect(dsn)
            try:
                return await con.fetch("SELECT * FROM llama_requests ORDER BY id")
            finally:
                await con.close()
        await asyncio.sleep(0.05)


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_BODY_BYTES="4096") as harness:
        yield harness


async def test_one_row_per_request_however_it_ends(proxy: Harness) -> None:
    alice = await proxy.user("alice")
    limited = await proxy.user("limited", rate_limit=1, rate_window_seconds=60)
    chat = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:

        async def call(method: str, url: str, **kwargs: Any) -> int:
            async with client.request(method, url, **kwargs) as r:
                await r.read()
                return r.status

        statuses = [
            await call("POST", chat, json=CHAT, headers=bearer(alice)),
            await call("POST", chat, json={**CHAT, "stream": True}, headers=bearer(alice)),
            await call("GET", proxy.url("/v1/models")),
            await call("GET", proxy.url("/v1/models"), headers=bearer("lgk_nonsense")),
            await call("GET", proxy.url("/v1/models"), headers=bearer(limited)),
            await call("GET", proxy.url("/v1/models"), headers=bearer(limited)),
            await call("POST", chat, data=b"x" * 5000, headers=bearer(alice)),
            await call("POST", chat, data=b"{", headers=bearer(alice)),
        ]
        proxy.upstream.mode = "error"
        statuses.append(await call("POST", chat, json=CHAT, headers=bearer(alice)))
        proxy.upstream.mode = "close-before-headers"
        statuses.append(await call("GET", proxy.url("/v1/models"), headers=bearer(alice)))
        proxy.upstream.mode, proxy.upstream.gate = "ok", asyncio.Event()
        r = await client.post(chat, json={**CHAT, "stream": True}, headers=bearer(alice))
        first_event = await r.content.readuntil(b"\r\n\r\n")
        r.close()
        statuses.append(499)
    assert statuses == [200, 200, 401, 401, 200, 429, 413, 400, 502, 502, 499]
    # A request with a valid key is a row of its own; the two without one are counted apart.
    keyed = [status for status in statuses if status != 401]
    rows = await _rows(proxy.dsn, len(keyed))
    assert Counter(row["status_code"] for row in rows) == Counter(keyed)
    [strangers] = await proxy.strangers()
    assert (strangers["client_addr"], strangers["requests"]) == ("127.0.0.1", 2)
    assert json.loads(strangers["statuses"]) == {"401": 2}
    assert json.loads(strangers["paths"]) == {"/v1/models": 2}
    by_status = {row["status_code"]: row for row in rows}
    assert by_status[429]["username"] == "limited"
    assert by_status[413]["username"] == "alice"
    disconnected = by_status[499]
    assert disconnected["stream"] is True
    assert 0 < disconnected["response_bytes"] >= len(first_event)
    assert disconnected["error"] == "client closed the connection"
    plain, streamed = rows[0], rows[1]
    assert plain["path"] == streamed["path"] == "/v1/chat/completions"
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (5, 2)
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (5, 2)
    assert plain["request_bytes"] == len(json.dumps(CHAT))
    assert plain["duration_ms"] >= plain["ttfb_ms"] > 0
    assert plain["key_id"] is not None
    assert plain["client_addr"] == "127.0.0.1"
    assert all(row["request_id"] for row in rows)
    assert len({row["request_id"] for row in rows}) == len(rows)


async def test_rows_arrive_within_about_a_second_without_the_request_waiting(
    proxy: Harness,
) -> None:
    alice = await proxy.user("alice")
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url("/v1/models"), headers=bearer(alice)) as r:
            assert r.status == 200
        answered = time.monotonic()
    rows = await _rows(proxy.dsn, 1, within=3)
    assert len(rows) == 1
    assert time.monotonic() - answered < 3  # the writer writes about once a second


async def test_postgres_stopped_and_started_mid_run_loses_and_doubles_nothing(
    own_postgres: LocalPostgres, tmp_path: Path
) -> None:
    _, alice = await make_user(own_postgres.dsn, "alice", rate_limit=1000)
    # A tiny memory bound, so the outage also exercises the spill file and its replay.
    settings = {"LLAMA_PROXY_AUDIT_MEMORY_ROWS": "5"}
    total = 30
    async with (
        running_proxy(own_postgres.dsn, tmp_path, **settings) as proxy,
        aiohttp.ClientSession() as client,
    ):

        async def call(index: int) -> int:
            path = "/v1/chat/completions" if index % 2 else "/v1/models"
            kwargs: dict[str, Any] = {"json": CHAT} if index % 2 else {}
            async with client.request(
                "POST" if index % 2 else "GET", proxy.url(path), headers=bearer(alice), **kwargs
            ) as r:
                await r.read()
                return r.status

        statuses = [await call(i) for i in range(10)]
        await asyncio.to_thread(own_postgres.stop)
        statuses += [await call(i) for i in range(10, 20)]
        await asyncio.sleep(2.0)  # the writer (a round a second) fails, holds, and spills
        assert list((tmp_path / "runtime" / "audit-spill").glob("spill-*.jsonl"))
        await asyncio.to_thread(own_postgres.start, True)
        statuses += [await call(i) for i in range(20, total)]
        rows = await _rows(own_postgres.dsn, total, within=20)
    assert statuses == [200] * total
    assert len(rows) == total
    assert Counter(row["path"] for row in rows) == Counter(
        {"/v1/chat/completions": total // 2, "/v1/models": total // 2}
    )
    assert len({row["request_id"] for row in rows}) == total
    assert not list((tmp_path / "runtime" / "audit-spill").glob("spill-*.jsonl"))


def _row(index: int) -> AuditRow:
    return AuditRow(
        request_id=f"req-{index}", created_at=datetime.now(UTC), user_id=None, username="u",
        key_id=None, method="GET", path="/v1/models", model=None, stream=None, status_code=200,
        duration_ms=1.5, ttfb_ms=1.0, queue_ms=0.0, request_bytes=0, response_bytes=10,
        prompt_tokens=None, completion_tokens=None, client_addr="127.0.0.1", error=None,
    )  # fmt: skip


async def test_rows_spilled_at_shutdown_are_replayed_once_at_the_next_start(
    own_postgres: LocalPostgres, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    dead = await asyncpg.create_pool(own_postgres.dsn, min_size=0)
    await asyncio.to_thread(own_postgres.stop)
    writer = AuditWriter(lambda: dead, spill, batch_size=4)
    task = asyncio.create_task(writer.run(shutdown_timeout=0.5))
    for index in range(10):
        writer.submit(_row(index))
    writer.stop()
    await task
    await dead.close()
    (spilled,) = spill.glob("spill-*.jsonl")
    copy = spill / "spill-1-0.jsonl"  # as if a second process found the same batches
    shutil.copy(spilled, copy)
    assert writer.rows_spilled == 10

    await asyncio.to_thread(own_postgres.start, True)
    pool = await asyncpg.create_pool(own_postgres.dsn)
    try:
        fresh = AuditWriter(lambda: pool, spill)
        task = asyncio.create_task(fresh.run())
        rows = await _rows(own_postgres.dsn, 10)
        fresh.stop()
        await task
    finally:
        await pool.close()
    assert sorted(row["request_id"] for row in rows) == sorted(f"req-{i}" for i in range(10))
    assert fresh.rows_written == 10
    assert not list(spill.glob("*.jsonl"))


@pytest.mark.slow
async def test_sigterm_under_load_finishes_requests_and_writes_every_row(
    db_dsn: str, tmp_path: Path
) -> None:
    _, alice = await make_user(db_dsn, "alice", rate_limit=10_000)
    upstream = FakeUpstream(expected_key=BACKEND_KEY, event_delay=0.1)
    await upstream.start()
    port = free_port()
    # The fake backend serves any number at once: let the proxy send it all of them.
    fair = {"LLAMA_BACKEND_SLOTS": "100", "LLAMA_PROXY_MAX_CONCURRENT": "100"}
    env = {**os.environ, **proxy_environ(db_dsn, upstream.port, tmp_path, **fair)}
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; waits are threaded
        [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    answered: list[int] = []
    try:
        await asyncio.to_thread(wait_for_health, url, process)
        async with aiohttp.ClientSession() as client:

            async def stream() -> None:
                body = {**CHAT, "stream": True}
                try:
                    async with client.post(
                        f"{url}/v1/chat/completions", json=body, headers=bearer(alice)
                    ) as r:
                        text = await r.text()
                        answered.append(r.status if text.endswith("[DONE]\r\n\r\n") else -1)
                except aiohttp.ClientError:
                    pass  # refused after the signal: it never reached the proxy, so no row

            async def load() -> None:
                tasks = []
                for _ in range(60):
                    tasks.append(asyncio.create_task(stream()))
                    await asyncio.sleep(0.02)
                await asyncio.gather(*tasks)

            loader = asyncio.create_task(load())
            await asyncio.sleep(0.6)
            process.send_signal(signal.SIGTERM)
            await loader
        assert await asyncio.to_thread(process.wait, 40) == 0
    finally:
        if process.poll() is None:
            process.kill()
        await upstream.stop()
        if process.stdout is not None:
            process.stdout.close()
    # The signal came mid-load: some streams were in flight, later ones were refused.
    assert 5 < len(answered) < 60, len(answered)
    assert set(answered) == {200}, "a stream in flight was cut by the shutdown"
    rows = await _rows(db_dsn, len(answered))
    assert len(rows) == len(answered)
    assert {row["status_code"] for row in rows} == {200}


async def test_a_row_postgres_refuses_is_set_aside_and_holds_nothing_back(
    db_dsn: str, tmp_path: Path
) -> None:
    pool = await asyncpg.create_pool(db_dsn)
    try:
        writer = AuditWriter(lambda: pool, tmp_path / "spill", batch_size=5)
        task = asyncio.create_task(writer.run())
        for index in range(5):
            row = _row(index)
            # NUL is no text to Postgres; row_from replaces it, so this bypasses row_from.
            writer.submit(row._replace(path="/v1/\x00") if index == 2 else row)
        for index in range(5, 8):
            writer.submit(_row(index))
        rows = await _rows(db_dsn, 7)
        writer.stop()
        await task
    finally:
        await pool.close()
    assert sorted(row["request_id"] for row in rows) == [f"req-{i}" for i in (0, 1, 3, 4, 5, 6, 7)]
    assert writer.rows_rejected == 1
    rejected = (tmp_path / "spill" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1
    assert json.loads(rejected[0])["row"]["request_id"] == "req-2"


async def test_a_nul_in_the_path_does_not_poison_the_log(proxy: Harness) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url("/v1/%00")) as r:
            assert r.status == 404
        async with client.get(proxy.url("/v1/models")) as r:
            assert r.status == 401
    [counted] = await proxy.strangers()
    assert json.loads(counted["paths"]) == {"/v1/\ufffd": 1, "/v1/models": 1}
    assert json.loads(counted["statuses"]) == {"404": 1, "401": 1}
    assert await _rows(proxy.dsn, 0, within=0.5) == []
