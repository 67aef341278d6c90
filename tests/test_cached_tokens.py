"""The backend's cached prompt tokens reach the client's usage, the audit row, the database and
the metrics, for streamed and assembled answers alike."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg
import openai
from prometheus_client.parser import text_string_to_metric_families

from proxy.db.localpg import free_port
from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import BACKEND_KEY, bearer, running_proxy

USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 2,
    "total_tokens": 42,
    "prompt_tokens_details": {"cached_tokens": 30},
}
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


async def _cached_column(dsn: str, count: int) -> list[int | None]:
    con = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            rows = await con.fetch("SELECT cached_tokens FROM llama_requests ORDER BY id")
            if len(rows) >= count:
                return [row["cached_tokens"] for row in rows]
            await asyncio.sleep(0.05)
    finally:
        await con.close()
    raise AssertionError(f"{len(rows)} rows, not {count}")


async def test_cached_tokens_flow_to_the_client_the_row_and_the_metrics(
    db_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    upstream = FakeUpstream(expected_key=BACKEND_KEY, usage=USAGE)
    async with running_proxy(
        db_dsn, tmp_path, upstream, LLAMA_PROXY_METRICS_PORT=str(port)
    ) as proxy:
        key = await proxy.user("alice")
        async with openai.AsyncOpenAI(
            base_url=proxy.url("/v1"), api_key=key, max_retries=0
        ) as client:
            whole = await client.chat.completions.create(model=MODEL, **CHAT)  # type: ignore[call-overload]
            stream = await client.chat.completions.create(
                model=MODEL, stream=True, stream_options={"include_usage": True}, **CHAT
            )  # type: ignore[call-overload]
            usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert whole.usage is not None
        assert whole.usage.prompt_tokens_details is not None
        assert whole.usage.prompt_tokens_details.cached_tokens == 30
        assert len(usages) == 1  # the progress event is the proxy's, never the client's
        assert usages[0].prompt_tokens_details is not None
        assert usages[0].prompt_tokens_details.cached_tokens == 30
        upstream.usage = None  # a backend that does not report cached tokens
        async with aiohttp.ClientSession() as http:
            async with http.post(
                proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
            ) as r:
                assert "prompt_tokens_details" not in (await r.json())["usage"]
            rows = await proxy.wait_for_records(3)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
    assert [row.cached_tokens for row in rows] == [30, 30, None]
    assert await _cached_column(db_dsn, 3) == [30, 30, None]
    samples = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("llama_gate_prompt_tokens_total", ("cache",))] == 60
    assert samples[("llama_gate_prompt_tokens_total", ("processed",))] == 20 + 5
