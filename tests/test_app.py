"""The application's seams: one row per request to the completion hooks however the request
ends, and a replaceable `Backends` that decides where a request goes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.appkeys import BACKENDS, COMPLETION_HOOKS
from proxy.audit.row import AuditRow
from proxy.pipeline.outcome import Outcome
from proxy.upstream.backends import Backends, Upstream
from tests.proxy_harness import Harness, bearer, proxy_settings, running_proxy

CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_BODY_BYTES="4096") as harness:
        yield harness


async def test_every_way_a_request_ends_gives_exactly_one_record(proxy: Harness) -> None:
    alice = await proxy.user("alice")
    limited = await proxy.user("limited", rate_limit=1, rate_window_seconds=60)
    chat = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:

        async def call(method: str, url: str, **kwargs: object) -> int:
            async with client.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
                await r.read()
                return r.status

        expected = [
            await call("POST", chat, json=CHAT, headers=bearer(alice)),
            await call("POST", chat, json={**CHAT, "stream": True}, headers=bearer(alice)),
            await call("GET", proxy.url("/v1/models")),
            await call("GET", proxy.url("/v1/models"), headers=bearer(limited)),
            await call("GET", proxy.url("/v1/models"), headers=bearer(limited)),
            await call("POST", chat, data=b"x" * 5000, headers=bearer(alice)),
            await call("POST", chat, data=b"{", headers=bearer(alice)),
            await call("GET", proxy.url("/nowhere"), headers=bearer(alice)),
        ]
        proxy.upstream.mode = "error"
        expected.append(await call("POST", chat, json=CHAT, headers=bearer(alice)))
        proxy.upstream.mode = "close-before-headers"
        expected.append(await call("GET", proxy.url("/v1/models"), headers=bearer(alice)))
        proxy.upstream.mode, proxy.upstream.gate = "ok", asyncio.Event()
        r = await client.post(chat, json={**CHAT, "stream": True}, headers=bearer(alice))
        await r.content.readuntil(b"\r\n\r\n")
        r.close()
        expected.append(499)
        await proxy.upstream.client_left.wait()
        await proxy.wait_for_records(len(expected))
        await proxy.upstream.stop()
        expected.append(await call("GET", proxy.url("/v1/models"), headers=bearer(alice)))
        await call("GET", proxy.url("/health"))
    records = await proxy.wait_for_records(len(expected))
    await asyncio.sleep(0.1)  # nothing more arrives late
    assert expected == [200, 200, 401, 200, 429, 413, 400, 404, 502, 502, 499, 503]
    assert [record.status_code for record in records] == expected
    assert len({record.request_id for record in records}) == len(records)

    plain, streamed, anonymous = records[0], records[1], records[2]
    assert (plain.username, plain.model, plain.stream) == ("alice", "smollm2-test", False)
    assert plain.user_id is not None
    assert plain.key_id == alice.split("_")[1]
    assert (plain.method, plain.path, plain.client_addr) == (
        "POST",
        "/v1/chat/completions",
        "127.0.0.1",
    )
    assert plain.request_bytes == len(json.dumps(CHAT))
    assert plain.response_bytes > 0
    assert plain.backend == "default"
    assert plain.queue_ms is not None
    assert plain.ttfb_ms is not None
    assert plain.duration_ms is not None
    assert plain.ttfb_ms <= plain.duration_ms
    assert plain.error is None
    assert streamed.stream is True
    assert (anonymous.user_id, anonymous.username, anonymous.key_id) == (None, None, None)
    errors = [record.error for record in records]
    assert errors[2:8] == [
        "invalid_api_key", None, "rate_limit_exceeded", "request_too_large", "invalid_json",
        "unknown_url",
    ]  # fmt: skip
    assert str(errors[8]).startswith("model_server_unavailable: The model server failed")
    assert str(errors[9]).startswith("model_server_unavailable: The model server is not reachable")
    assert errors[10] == "client closed the connection"
    assert str(errors[11]).startswith("model_server_unavailable")


async def test_a_failing_hook_is_logged_and_neither_the_request_nor_other_hooks_suffer(
    proxy: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(row: AuditRow) -> None:
        raise RuntimeError("audit queue on fire")

    proxy.app[COMPLETION_HOOKS].insert(0, broken)
    key = await proxy.user("alice")
    async with (
        aiohttp.ClientSession() as client,
        client.get(proxy.url("/v1/models"), headers=bearer(key)) as r,
    ):
        assert r.status == 200
    assert [record.status_code for record in await proxy.wait_for_records(1)] == [200]
    assert "completion hook" in caplog.text


class CountingBackends(Backends):
    """What a scheduler does: decide the upstream, measure the wait, hold it for the exchange."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        super().__init__(upstreams)
        self.held: list[str | None] = []
        self.released = 0

    @asynccontextmanager
    async def acquire(
        self, user: Any, model: str | None, outcome: Outcome, *args: Any
    ) -> AsyncIterator[Upstream]:
        self.held.append(user)
        async with super().acquire(user, model, outcome, *args) as upstream:
            outcome.queue_ms = 12.5
            try:
                yield upstream
            finally:
                self.released += 1


@asynccontextmanager
async def _app_with(backends: Backends, db_dsn: str, tmp_path: Path) -> AsyncIterator[str]:
    app = create_app(proxy_settings(db_dsn, 9, tmp_path))
    app[BACKENDS] = backends
    async with TestServer(app) as server:
        yield str(server.make_url("/"))


async def test_a_replacement_backends_chooses_the_upstream_and_is_held_for_the_stream(
    proxy: Harness, db_dsn: str, tmp_path: Path
) -> None:
    target = proxy.app[BACKENDS].upstreams[0]
    backends = CountingBackends([target])
    key = await proxy.user("alice")
    async with _app_with(backends, db_dsn, tmp_path) as base, aiohttp.ClientSession() as client:
        body = {**CHAT, "stream": True}
        async with client.post(f"{base}v1/chat/completions", json=body, headers=bearer(key)) as r:
            assert backends.released == 0  # still held while the stream runs
            assert (await r.read()).endswith(b"data: [DONE]\r\n\r\n")
    assert len(backends.held) == 1
    assert backends.released == 1


async def test_an_unexpected_failure_is_a_500_in_the_api_shape(
    proxy: Harness, db_dsn: str, tmp_path: Path
) -> None:
    class Broken(Backends):
        @asynccontextmanager
        async def acquire(self, *args: Any) -> AsyncIterator[Upstream]:
            raise RuntimeError("scheduler bug")
            yield self.upstreams[0]

    key = await proxy.user("alice")
    broken = Broken(proxy.app[BACKENDS].upstreams)
    async with (
        _app_with(broken, db_dsn, tmp_path) as base,
        aiohttp.ClientSession() as client,
        client.get(f"{base}v1/models", headers=bearer(key)) as r,
    ):
        assert r.status == 500
        body = await r.json()
        assert r.headers["X-Request-Id"]
    assert body["error"]["type"] == "server_error"
    assert "scheduler bug" not in body["error"]["message"]
