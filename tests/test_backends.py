"""Several backends behind one proxy: routing by model and load, health probes, failover."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.appkeys import AUTH_LISTENER, BACKENDS, COMPLETION_HOOKS
from proxy.audit.row import AuditRow
from proxy.db.localpg import free_port
from proxy.settings import Secret
from proxy.upstream.backends import Backends, Upstream
from proxy.upstream.probes import Health
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, make_user, proxy_settings
from tests.sharing_helpers import chat, until
from tests.timed_upstream import TimedUpstream


def _upstream(port: int) -> Upstream:
    return Upstream.from_url(f"http://127.0.0.1:{port}", Secret(BACKEND_KEY))


@asynccontextmanager
async def _proxy(
    dsn: str,
    home: Path,
    ports: list[int],
    probe_interval: float = 3600.0,
    restart_wait: float = 30.0,
    **settings: str,
) -> AsyncIterator[tuple[str, Backends, list[AuditRow]]]:
    """The proxy in front of backends on `ports`, probing them at start and every
    `probe_interval` seconds; yields its chat URL, its Backends and the finished records."""
    urls = ",".join(f"http://127.0.0.1:{port}" for port in ports)
    app = create_app(proxy_settings(dsn, 9, home, LLAMA_SERVER_URLS=urls, **settings))
    backends = Backends(
        [_upstream(port) for port in ports],
        probe_interval=probe_interval,
        restart_wait=restart_wait,
    )
    app[BACKENDS] = backends
    records: list[AuditRow] = []
    app[COMPLETION_HOOKS].append(records.append)
    async with TestServer(app) as server:
        await asyncio.wait_for(app[AUTH_LISTENER].connected.wait(), 10)
        yield str(server.make_url("/v1/chat/completions")), backends, records


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _started(*upstreams: Any) -> None:
    for upstream in upstreams:
        await upstream.start()


async def test_a_dead_backend_among_two_is_taken_out_and_the_other_serves_everything(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    live, dead_port = TimedUpstream(service_time=0.01, models=("smollm2-test",)), free_port()
    await _started(live)
    try:
        async with _proxy(db_dsn, tmp_path, [dead_port, live.port]) as (url, backends, _):
            dead_name = f"127.0.0.1:{dead_port}"
            await until(lambda: not backends.is_up(dead_name))  # the probe at startup
            _, key = await make_user(db_dsn, "alice")
            results = await asyncio.gather(*(chat(client, url, key, "alice") for _ in range(4)))
            ready_url = url.replace("/v1/chat/completions", "/ready")
            async with client.get(ready_url) as r:
                ready = (r.status, await r.json())
    finally:
        await live.stop()
    assert [status for status, _, _ in results] == [200] * 4
    assert live.received == ["alice"] * 4
    assert ready[0] == 200
    assert ready[1]["status"] == f"ready, but failing: backend {dead_name}"
    assert ready[1]["checks"][f"backend {dead_name}"].startswith("not reachable")
    assert ready[1]["checks"][f"backend {live.url.removeprefix('http://')}"] == "ok"


async def test_a_refused_connection_is_retried_on_another_backend_and_takes_the_first_out(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    live, dead_port = TimedUpstream(service_time=0.01, models=("smollm2-test",)), free_port()
    await _started(live)
    try:
        async with _proxy(db_dsn, tmp_path, [dead_port, live.port]) as (url, backends, records):
            dead_name = f"127.0.0.1:{dead_port}"
            await until(lambda: not backends.is_up(dead_name))
            # As if it had died since the last probe: the first choice, being listed first.
            backends.report(dead_name, Health())
            _, key = await make_user(db_dsn, "alice")
            status, body, _ = await chat(client, url, key, "alice")
            await until(lambda: len(records) == 1)
            assert not backends.is_up(dead_name)
    finally:
        await live.stop()
    assert status == 200, body
    assert live.received == ["alice"]
    assert records[0].backend == live.url.removeprefix("http://")
    assert f"backend {dead_name} is out: refused a request" in caplog.text


async def test_a_request_that_reached_a_backend_is_never_sent_to_another(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    closing = FakeUpstream(expected_key=BACKEND_KEY, mode="close-before-headers")
    live = TimedUpstream(service_time=0.01, models=("smollm2-test",))
    await _started(closing, live)
    try:
        async with _proxy(db_dsn, tmp_path, [closing.port, live.port]) as (url, _, _):
            _, key = await make_user(db_dsn, "alice")
            status, body, _ = await chat(client, url, key, "alice")
    finally:
        await closing.stop()
        await live.stop()
    assert status == 502, body
    assert len(closing.seen) == 1
    assert live.received == []


async def test_a_backend_that_comes_back_is_taken_in_again_and_load_is_spread(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    first = TimedUpstream(service_time=0.2, models=("smollm2-test",))
    second = TimedUpstream(service_time=0.2, models=("smollm2-test",))
    await _started(first)
    try:
        async with _proxy(db_dsn, tmp_path, [first.port, second.port], probe_interval=0.05) as (
            url,
            backends,
            _,
        ):
            second_name = f"127.0.0.1:{second.port}"
            await until(lambda: not backends.is_up(second_name))
            await second.start()
            await until(lambda: backends.is_up(second_name))
            _, key = await make_user(db_dsn, "alice")
            results = await asyncio.gather(*(chat(client, url, key, "alice") for _ in range(4)))
    finally:
        await first.stop()
        await second.stop()
    assert [status for status, _, _ in results] == [200] * 4
    # Two at a time, one on each: the shortest queue wins, and no slot is ever doubled up.
    assert (len(first.served), len(second.served)) == (2, 2)
    assert (first.most_active, second.most_active) == (1, 1)


async def test_requests_go_to_a_backend_that_serves_their_model(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    small = TimedUpstream(service_time=0.01, models=("small", "tiny"))
    big = TimedUpstream(service_time=0.01, models=("big",))
    await _started(small, big)
    try:
        async with _proxy(db_dsn, tmp_path, [big.port, small.port]) as (url, backends, _):
            await backends.prober.probe(5.0)  # what each serves is known before the first request
            _, key = await make_user(db_dsn, "alice")
            asked: list[str | None] = ["small", "big", "tiny", None, "big", None]
            for model in asked:
                fields = {} if model is None else {"model": model}
                assert (await chat(client, url, key, str(model), **fields))[0] == 200
    finally:
        await small.stop()
        await big.stop()
    assert [s.user for s in small.served] == ["small", "tiny"]
    # No model named: the first backend's default, wherever that is served.
    assert [s.user for s in big.served] == ["big", "None", "big", "None"]


async def test_with_every_backend_down_a_request_is_answered_503_at_once(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ports = [free_port(), free_port()]
    async with _proxy(db_dsn, tmp_path, ports) as (url, backends, _):
        names = [f"127.0.0.1:{port}" for port in ports]
        await until(lambda: not any(backends.is_up(name) for name in names))
        _, key = await make_user(db_dsn, "alice")
        status, body, headers = await chat(client, url, key, "alice")
        async with client.get(url.replace("/v1/chat/completions", "/ready")) as r:
            ready = (r.status, await r.json())
    assert status == 503
    assert "no backend is up right now" in body["error"]["message"]
    assert headers["Retry-After"] == "5"
    assert ready[0] == 503
    assert ready[1]["status"] == f"not ready: backend {names[0]}, backend {names[1]}"


async def test_a_backend_that_went_down_is_waited_for_and_the_queue_served_when_it_is_back(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """Its supervisor restarts a backend that dies: requests waiting for it (and those that
    arrive meanwhile) are served once it is back, within their queue timeout, not failed."""
    upstream = TimedUpstream(service_time=0.01, models=("smollm2-test",))
    await upstream.start()
    try:
        async with _proxy(db_dsn, tmp_path, [upstream.port], probe_interval=0.2) as (
            url, backends, records,
        ):  # fmt: skip
            name = f"127.0.0.1:{upstream.port}"
            _, key = await make_user(db_dsn, "alice")
            assert (await chat(client, url, key, "alice"))[0] == 200  # it served: seen up
            await upstream.stop()
            await until(lambda: not backends.is_up(name))
            waiting = [asyncio.create_task(chat(client, url, key, "alice")) for _ in range(3)]
            await asyncio.sleep(1.0)
            assert not any(task.done() for task in waiting)
            await upstream.start()  # back, on the same port
            answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [status for status, _, _ in answers] == [200, 200, 200]
        assert [r.status_code for r in records] == [200, 200, 200, 200]
    finally:
        await upstream.stop()


async def test_a_backend_down_past_the_restart_wait_is_a_503_at_once(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    upstream = TimedUpstream(service_time=0.01, models=("smollm2-test",))
    await upstream.start()
    try:
        async with _proxy(
            db_dsn, tmp_path, [upstream.port], probe_interval=0.2, restart_wait=0.5
        ) as (url, backends, _):
            name = f"127.0.0.1:{upstream.port}"
            _, key = await make_user(db_dsn, "alice")
            assert (await chat(client, url, key, "alice"))[0] == 200
            await upstream.stop()
            await until(lambda: not backends.is_up(name))
            waited = asyncio.create_task(chat(client, url, key, "alice"))
            status, body, _ = await asyncio.wait_for(waited, 5)  # failed once the wait is over
            assert status == 503
            await asyncio.sleep(0.6)
            started = asyncio.get_running_loop().time()
            status, body, _ = await chat(client, url, key, "alice")  # now: at once
            assert status == 503
            assert asyncio.get_running_loop().time() - started < 0.5
            assert "no backend is up right now" in body["error"]["message"]
    finally:
        await upstream.stop()
