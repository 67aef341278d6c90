"""Generated requests thrown at the proxy: whatever they hold, the proxy never answers with a 5xx
of its own making, never shows a traceback, never lets a request reach the backend without its
checks, and always leaves an audit row."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy import health
from tests.proxy_harness import BACKEND_KEY, running_proxy

T = TypeVar("T")

CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}
PATHS = [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
    "/v1/models/smollm2-test", "/chat/completions", "/models", "/v1/messages", "/", "/health",
]  # fmt: skip
PROBES = health.PATHS  # no API requests: no rows
BACKEND_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
     "temperature", "top_p", "n", "top_logprobs", "logprobs", "stop", "logit_bias",
     "response_format", "tools", "tool_choice", "prompt", "input", "seed", "user"]
)  # fmt: skip
mutated_chat = st.dictionaries(fields, json_values, max_size=4).map(lambda d: {**CHAT, **d})
bodies = st.one_of(
    mutated_chat.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=200),
    st.just(b""),
)
pieces = st.sampled_from([*"abcv1./%2eEfF\\-_~", "%2F", "%2e", "%00", "%ff", "..", "%252e"])
segment = st.lists(pieces, max_size=8).map("".join)
paths = st.one_of(
    st.sampled_from(PATHS),
    st.tuples(st.sampled_from(PATHS), segment).map(lambda p: p[0] + "/" + p[1]),
    st.lists(segment, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        [
            "X-Request-Id",
            "Content-Type",
            "Expect",
            "Origin",
            "Accept",
            "X-Forwarded-For",
            "Connection",
            "Transfer-Encoding-Hint",
            "x-api-key",
            "anthropic-version",
        ]
    ),
    header_text,
    max_size=4,
)
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        "path": paths,
        "headers": headers,
        "body": bodies,
        "key": st.sampled_from(["good", "good", "good", "none", "bad"]),
    }
)


def _checked_at_the_backend(method: str, path: str, body: bytes, headers: Any) -> None:
    """What reaches the backend went through the proxy's own checks and rewriting."""
    assert path in BACKEND_PATHS, path
    assert headers["Authorization"] == f"Bearer {BACKEND_KEY}"
    uuid.UUID(headers["X-Request-Id"])
    if path in {"/v1/chat/completions", "/v1/completions"}:
        sent = json.loads(body)
        assert sent["stream"] is True
        assert sent["stream_options"]["llama_gate_progress"] is True
        assert 0 < sent["max_tokens"] <= 1024
        assert sent.get("n", 1) == 1
    elif method == "POST":
        assert isinstance(json.loads(body), dict)
    else:
        assert body == b""


async def test_generated_requests_never_break_the_front_door(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_proxy(db_dsn, tmp_path) as proxy, aiohttp.ClientSession() as client:
        key = await proxy.user("fuzz", rate_limit=1_000_000)
        loop = asyncio.get_running_loop()
        sent = 0

        def on_loop(work: Awaitable[T]) -> T:
            return asyncio.run_coroutine_threadsafe(work, loop).result(30)  # type: ignore[arg-type]

        async def send(request: dict[str, Any]) -> tuple[int, bytes]:
            header = dict(request["headers"])
            if request["key"] == "good":
                header["Authorization"] = f"Bearer {key}"
            elif request["key"] == "bad":
                header["Authorization"] = "Bearer lgk_0123456789abcdef_" + "x" * 43
            url = URL(proxy.url("/")).with_path(request["path"], encoded=True)
            body = request["body"] if request["method"] not in {"GET", "HEAD"} else None
            async with client.request(
                request["method"], url, headers=header, data=body, allow_redirects=False
            ) as response:
                answer = await response.read()
                return response.status, answer

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(requests)
        def one(request: dict[str, Any]) -> None:
            nonlocal sent
            status, answer = on_loop(send(request))
            probe = request["path"] in PROBES and request["method"] in {"GET", "HEAD"}
            sent += not probe  # probes are no API requests
            assert status < 500, (request, status, answer[:300])
            assert b"Traceback" not in answer
            assert b"/llama_cpp/" not in answer

        await asyncio.to_thread(one)
        for seen in proxy.upstream.seen:
            _checked_at_the_backend(seen.method, seen.path, seen.body, seen.headers)
        rows = await proxy.wait_for_records(sent)
        await asyncio.sleep(0.2)
        assert len(proxy.records) == sent  # one row per request, no more
        assert all(row.status_code < 500 for row in rows)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
