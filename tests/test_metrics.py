"""Prometheus metrics: fed by finished requests, served on their own loopback listener only."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.audit.row import AuditRow
from proxy.db.localpg import free_port
from proxy.metrics import MAX_USER_LABELS, Metrics
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


def _row(path: str, status: int, duration_ms: float, **more: object) -> AuditRow:
    fields: dict[str, object] = {
        "request_id": None, "created_at": datetime.now(UTC), "user_id": None, "username": None,
        "key_id": None, "method": "POST", "path": path, "model": None, "stream": False,
        "status_code": status, "duration_ms": duration_ms, "ttfb_ms": None, "queue_ms": None,
        "request_bytes": 0, "response_bytes": 0, "prompt_tokens": None,
        "completion_tokens": None, "client_addr": None, "error": None,
    }  # fmt: skip
    return AuditRow(**{**fields, **more})  # type: ignore[arg-type]


def test_histograms_and_counters_add_up_as_prometheus_reads_them() -> None:
    """Counted in plain numbers, laid out at scrape time: each bucket holds every request at or
    under its bound (cumulative), sums and counts agree, and unknown paths and users past the
    label cap fall into "other"."""
    route = "/v1/chat/completions"
    metrics = Metrics([route])
    for ms in (5.0, 5.0001, 40.0, 700.0, 700_000.0):  # 0.005 s is in the le="0.005" bucket
        metrics.observe(_row(route, 200, ms, queue_ms=1.0, ttfb_ms=2.0))
    metrics.observe(_row("/nowhere", 404, 1.0))
    metrics.observe(_row(route, 429, 1.0))
    for n in range(MAX_USER_LABELS + 2):
        metrics.observe(
            _row(route, 200, 1.0, username=f"u{n}", prompt_tokens=10, completion_tokens=3,
                 cached_tokens=4)
        )  # fmt: skip
    samples = _samples(generate_latest(metrics.registry).decode())

    def bucket(le: str, path: str = route) -> float:
        key = (("le", le), ("route", path))
        return samples[("llama_gate_request_duration_seconds_bucket", key)]

    others = MAX_USER_LABELS + 2 + 1  # the user rows and the 429, all of 1 ms
    assert bucket("0.005") == others + 1
    assert bucket("0.01") == others + 2
    assert bucket("0.05") == others + 3
    assert bucket("1.0") == others + 4
    assert bucket("600.0") == others + 4
    assert bucket("+Inf") == others + 5
    count = samples[("llama_gate_request_duration_seconds_count", (("route", route),))]
    assert count == others + 5
    total = samples[("llama_gate_request_duration_seconds_sum", (("route", route),))]
    assert total == pytest.approx((5.0 + 5.0001 + 40.0 + 700.0 + 700_000.0 + others) / 1000)
    assert bucket("0.005", "other") == 1
    assert samples[("llama_gate_queue_wait_seconds_count", ())] == 5
    assert samples[("llama_gate_queue_wait_seconds_bucket", (("le", "0.005"),))] == 5
    assert samples[("llama_gate_upstream_duration_seconds_count", (("route", route),))] == 5
    assert samples[("llama_gate_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert samples[("llama_gate_requests_total", (("route", route), ("status", "200")))] == (
        5 + MAX_USER_LABELS + 2
    )
    assert samples[("llama_gate_rate_limited_total", ())] == 1
    assert samples[("llama_gate_tokens_total", (("kind", "prompt"), ("user", "u0")))] == 10
    assert samples[("llama_gate_tokens_total", (("kind", "completion"), ("user", "other")))] == 6
    users = {labels for name, labels in samples if name == "llama_gate_tokens_total"}
    assert len(users) == 2 * (MAX_USER_LABELS + 1)  # the cap's users and "other", two kinds
    assert samples[("llama_gate_prompt_tokens_total", (("source", "cache"),))] == 4 * (
        MAX_USER_LABELS + 2
    )
    assert samples[("llama_gate_prompt_tokens_total", (("source", "processed"),))] == 6 * (
        MAX_USER_LABELS + 2
    )
