"""Prometheus metrics: fed by finished requests, served on their own loopback listener only."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.db.localpg import free_port
from tests.proxy_harness import bearer, running_proxy


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests_tokens_and_refusals(db_dsn: str, tmp_path: Path) -> None:
    port = free_port()
    async with (
        running_proxy(
            db_dsn, tmp_path, LLAMA_PROXY_METRICS_PORT=str(port), LLAMA_PROXY_RATE_LIMIT="2"
        ) as proxy,
        aiohttp.ClientSession() as client,
    ):
        alice = await proxy.user("alice")
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        for _ in range(3):
            async with client.post(
                proxy.url("/v1/chat/completions"), json=chat, headers=bearer(alice)
            ) as r:
                await r.read()
        async with client.get(proxy.url("/v1/models"), headers=bearer("lgk_wrong")) as r:
            assert r.status == 401
        await proxy.wait_for_records(4)
        backlog = []
        for _ in range(80):  # the writer writes about once a second: the backlog must empty
            async with client.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                samples = _samples(await r.text())
            backlog.append(samples[("llama_gate_audit_backlog_rows", ())])
            if backlog[-1] == 0:
                break
            await asyncio.sleep(0.05)
        # Not on the public listener.
        async with client.get(proxy.url("/metrics")) as r:
            assert r.status == 404
            assert "llama_gate_requests_total" not in await r.text()

    route = "/v1/chat/completions"
    assert samples[("llama_gate_requests_total", (("route", route), ("status", "200")))] == 2
    assert samples[("llama_gate_requests_total", (("route", route), ("status", "429")))] == 1
    assert samples[("llama_gate_requests_total", (("route", "/v1/models"), ("status", "401")))] == 1
    assert samples[("llama_gate_rate_limited_total", ())] == 1
    assert samples[("llama_gate_auth_failures_total", ())] == 1
    assert samples[("llama_gate_tokens_total", (("kind", "prompt"), ("user", "alice")))] == 10
    assert samples[("llama_gate_tokens_total", (("kind", "completion"), ("user", "alice")))] == 4
    duration = ("llama_gate_request_duration_seconds_count", (("route", route),))
    assert samples[duration] == 3
    assert samples[("llama_gate_time_to_first_byte_seconds_count", (("route", route),))] == 2
    assert samples[("llama_gate_upstream_duration_seconds_count", (("route", route),))] == 2
    assert samples[("llama_gate_queue_wait_seconds_count", ())] == 2
    assert samples[("llama_gate_requests_in_flight", ())] == 0
    assert backlog[-1] == 0, backlog
    assert samples[("llama_gate_audit_spill_bytes", ())] == 0


async def test_a_taken_metrics_port_is_a_clear_error(db_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"
        ) as caught:
            async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_METRICS_PORT=str(port)):
                pass
    assert "LLAMA_PROXY_METRICS_PORT" in str(caught.value)
