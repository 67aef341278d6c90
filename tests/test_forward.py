"""Forwarding: what reaches the backend, what comes back, and how failures read."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, Harness, bearer, running_proxy


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_BODY_BYTES="4096") as harness:
        yield harness


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}


async def test_chat_is_forwarded_with_the_backend_key_not_the_clients(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    async with client.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["choices"][0]["message"]["content"] == "Hello world"
    seen = proxy.upstream.seen[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {BACKEND_KEY}"
    assert key not in str(dict(seen.headers))
    # The body arrives as checked: with the max_tokens cap the client left out, and as a
    # stream with usage (the proxy assembles the one JSON answer the client asked for).
    assert json.loads(seen.body) == {
        **CHAT,
        "max_tokens": 1024,
        "stream": True,
        "stream_options": {"include_usage": True, "llama_gate_progress": True},
    }


async def test_sse_events_reach_the_client_as_the_backend_sends_them(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.gate = asyncio.Event()  # the backend sends one event, then waits for us
    body = {**CHAT, "stream": True}
    async with client.post(proxy.url("/v1/chat/completions"), json=body, headers=bearer(key)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"
        # Arrives while the backend is still holding the rest: nothing buffers it.
        first = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
        assert b'"role": "assistant"' in first
        assert not proxy.upstream.gate.is_set()
        proxy.upstream.gate.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert b": ping" in rest  # comments pass through too
    assert b"Hello" in rest
    assert b" world" in rest
    assert rest.endswith(b"data: [DONE]\r\n\r\n")


async def test_a_streams_headers_leave_at_once_while_the_backend_reads_the_prompt(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    """The headers wait for the first bytes only while those are at hand: a backend slow to
    give its first chunk (a long prompt to read) does not keep the client from its 200."""
    key = await proxy.user("alice")
    proxy.upstream.event_delay = 1.5  # after its first event (the prompt's usage, not relayed)
    body = {**CHAT, "stream": True}
    began = time.monotonic()
    async with client.post(proxy.url("/v1/chat/completions"), json=body, headers=bearer(key)) as r:
        headers_after = time.monotonic() - began
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
        first_after = time.monotonic() - began
        await r.read()
    assert b'"role": "assistant"' in first
    assert first_after >= 1.4
    assert headers_after < 1.0, f"headers came after {headers_after:.2f} s"


async def test_none_of_the_clients_headers_reach_the_backend(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    """The backend needs none of them, and none should reach it: its credentials, hop-by-hop
    headers, and whatever else a client sends stay at the proxy."""
    key = await proxy.user("alice")
    headers = {
        "x-api-key": key,
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "only for the next hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Host": "proxy.example",
        "X-Forwarded-For": "203.0.113.7",  # from an untrusted peer: ignored
        "X-Custom": "not needed",
    }
    async with client.get(proxy.url("/v1/models"), headers=headers) as r:
        assert r.status == 200
    seen = proxy.upstream.seen[-1].headers
    for name in ("x-api-key", "X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "X-Custom"):
        assert name not in seen, name
    assert seen["Host"] == f"127.0.0.1:{proxy.upstream.port}"
    assert seen["Authorization"] == f"Bearer {BACKEND_KEY}"
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # the client, as the proxy knows it


async def test_the_clients_request_id_is_returned_and_recorded_but_the_backend_gets_ours(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    given = {**bearer(key), "X-Request-Id": "abc-123"}  # llama_cpp.server would answer 400
    for _ in range(2):  # the same id twice: still two requests apart in the ledger
        async with client.get(proxy.url("/v1/models"), headers=given) as r:
            assert r.headers["X-Request-Id"] == "abc-123"
    ours = [uuid.UUID(seen.headers["X-Request-Id"]) for seen in proxy.upstream.seen]
    async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
        generated = r.headers["X-Request-Id"]
    assert uuid.UUID(proxy.upstream.seen[-1].headers["X-Request-Id"]).hex == generated
    async with client.get(proxy.url("/v1/models"), headers={"X-Request-Id": "bad id"}) as r:
        assert r.status == 401  # errors carry one too, and a bad one is replaced
        assert r.headers["X-Request-Id"] != "bad id"
    rows = await proxy.wait_for_records(4)
    assert [row.client_request_id for row in rows] == ["abc-123", "abc-123", None, None]
    assert [row.request_id for row in rows[:2]] == [u.hex for u in ours]
    assert len({row.request_id for row in rows}) == 4


async def test_unprefixed_aliases_reach_their_route_and_other_paths_never_the_backend(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    async with client.post(proxy.url("/chat/completions"), json=CHAT, headers=bearer(key)) as r:
        assert r.status == 200
    assert proxy.upstream.seen[-1].path == "/v1/chat/completions"
    async with client.get(proxy.url("/models"), headers=bearer(key)) as r:
        assert (await r.json())["data"][0]["id"] == "smollm2-test"
    async with client.get(proxy.url("/v1/models/smollm2-test"), headers=bearer(key)) as r:
        assert (await r.json())["id"] == "smollm2-test"  # the OpenAI SDK's models.retrieve
    async with client.get(proxy.url("/models/nope"), headers=bearer(key)) as r:
        assert r.status == 404
        assert (await _error(r))["code"] == "model_not_found"
    seen = len(proxy.upstream.seen)
    # Not in the route table: llama_cpp.server's own copy of completions, and anything else.
    for method, path in (
        ("POST", "/v1/engines/copilot-codex/completions"),
        ("DELETE", "/v1/extras/whatever"),
        ("POST", "/v1/chat/completions/"),
    ):
        async with client.request(method, proxy.url(path), json=CHAT, headers=bearer(key)) as r:
            assert r.status == 404, path
            assert (await _error(r))["code"] == "unknown_url"
    async with client.get(proxy.url("/v1/chat/completions"), headers=bearer(key)) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
    assert len(proxy.upstream.seen) == seen
    # Each leaves a row naming the API it reached: the route's own path, whatever the alias.
    rows = await proxy.wait_for_records(8)
    assert [(row.method, row.path, row.status_code) for row in rows] == [
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/v1/models/{model}", 200),
        ("GET", "/v1/models/{model}", 404),
        ("POST", "/v1/engines/copilot-codex/completions", 404),
        ("DELETE", "/v1/extras/whatever", 404),
        ("POST", "/v1/chat/completions/", 404),
        ("GET", "/v1/chat/completions", 405),
    ]


async def test_one_upstream_connection_is_kept_alive_across_requests(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    for _ in range(3):
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 200
    assert len({seen.peer for seen in proxy.upstream.seen}) == 1


async def _error(response: aiohttp.ClientResponse) -> dict[str, object]:
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


async def test_oversized_body_is_413_before_reaching_the_backend(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with client.post(proxy.url("/v1/chat/completions"), json=big, headers=bearer(key)) as r:
        assert r.status == 413
        error = await _error(r)
    assert error["type"] == "invalid_request_error"
    assert "4096 bytes" in str(error["message"])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while it arrives
        for _ in range(10):
            yield b"y" * 1000

    url = proxy.url("/v1/embeddings")
    async with client.post(url, data=chunks(), headers=bearer(key)) as r:
        assert r.status == 413
        await _error(r)
    assert proxy.upstream.seen == []


@pytest.mark.parametrize(
    ("payload", "detail"),
    [(b'{"model": ', "Expecting value"), (b"[1, 2]", "expected an object"), (b"\xff", "UTF-8")],
)
async def test_malformed_json_is_400_in_the_api_shape(
    proxy: Harness, client: aiohttp.ClientSession, payload: bytes, detail: str
) -> None:
    key = await proxy.user("alice")
    headers = {**bearer(key), "Content-Type": "application/json"}
    async with client.post(proxy.url("/v1/chat/completions"), data=payload, headers=headers) as r:
        assert r.status == 400
        error = await _error(r)
    assert error["code"] == "invalid_json"
    assert detail in str(error["message"])
    assert proxy.upstream.seen == []


async def test_backend_down_is_503_saying_the_model_server_is_not_reachable(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    await proxy.upstream.stop()
    async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
        assert r.status == 503
        error = await _error(r)
    assert "model server is not reachable" in str(error["message"])
    assert error["type"] == "server_error"


async def test_backend_closing_without_an_answer_is_502(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode = "close-before-headers"
    async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
        assert r.status == 502
        assert "not reachable" in str((await _error(r))["message"])


async def test_backend_silent_past_the_timeout_is_504(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, mode="hang")
    async with running_proxy(
        db_dsn, tmp_path, upstream, LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS="1"
    ) as proxy:
        key = await proxy.user("alice")
        started = time.monotonic()
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 504
            assert "did not answer in time" in str((await _error(r))["message"])
        assert time.monotonic() - started < 5
        await asyncio.wait_for(upstream.client_left.wait(), 2)  # and the backend was let go


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        # A backend's 500 may hold a traceback or its file paths: only the log gets it.
        (500, {"detail": "model exploded at /srv/llama_cpp/server/app.py"},
         "The model server failed on this request; the error is logged. Try again."),
        # A backend's own words never reach the client (they may hold file paths): the field
        # it names is kept, the message is the proxy's.
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required at /srv/x.py"}]},
         "The model server cannot serve this request as sent: check 'messages'."),
        (400, {"error": {"message": "jinja2 failed in /srv/template.py", "type": "x",
                         "param": "messages", "code": "template_error"}},
         "The model's chat template cannot render these messages (a content part it does not "
         "take, such as an image, or a role it does not know); send plain text messages."),
        (400, {"error": {"message": "context too long", "type": "invalid_request_error",
                         "param": "messages", "code": "context_length_exceeded",
                         "prompt_tokens": 3000, "n_ctx": 2048}},
         "This model's maximum context length is 2048 tokens, and the prompt is 3000 tokens. "
         "Shorten the prompt."),
    ],
)  # fmt: skip
async def test_backend_errors_are_rewritten_into_the_openai_shape(
    proxy: Harness, client: aiohttp.ClientSession, status: int, body: object, message: str
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode, proxy.upstream.error_status, proxy.upstream.error_body = (
        "error", status, body,
    )  # fmt: skip
    async with client.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)) as r:
        # FastAPI's 422 is a request error to OpenAI clients: 400, naming the field.
        assert r.status == {500: 502, 422: 400}.get(status, status)
        error = await _error(r)
    assert error["message"] == message
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["param"] == (None if status >= 500 else "messages")
    if "context" in message:
        assert error["code"] == "context_length_exceeded"  # OpenAI's code for it


async def test_backend_refusing_the_proxys_key_is_502_not_the_clients_401(
    db_dsn: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream(expected_key="some-other-key")
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await proxy.user("alice")
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 502
            assert "credentials" in str((await _error(r))["message"])
            assert "WWW-Authenticate" not in r.headers


async def test_client_disconnect_closes_the_backend_request_at_once(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.gate = asyncio.Event()  # the backend would stream forever
    body = {**CHAT, "stream": True}
    r = await client.post(proxy.url("/v1/chat/completions"), json=body, headers=bearer(key))
    await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
    r.close()  # the client goes away mid-stream
    gone = time.monotonic()
    await asyncio.wait_for(proxy.upstream.client_left.wait(), 5)
    assert proxy.upstream.client_left_at is not None
    assert proxy.upstream.client_left_at - gone < 1.0
    assert [r.status_code for r in await proxy.wait_for_records(1)] == [499]


async def test_client_disconnect_before_the_backend_answers_closes_it_too(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode = "hang"
    request = asyncio.create_task(client.get(proxy.url("/v1/models"), headers=bearer(key)))
    await asyncio.wait_for(proxy.upstream.received.wait(), 5)
    request.cancel()
    gone = time.monotonic()
    await asyncio.wait_for(proxy.upstream.client_left.wait(), 5)
    assert proxy.upstream.client_left_at is not None
    assert proxy.upstream.client_left_at - gone < 1.0


async def test_backend_breaking_off_mid_stream_is_a_visible_cut_for_the_client(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode = "close-mid-stream"
    body = {**CHAT, "stream": True}
    async with client.post(proxy.url("/v1/chat/completions"), json=body, headers=bearer(key)) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.content.read(), 5)
    (record,) = await proxy.wait_for_records(1)
    assert record.error is not None
    assert "broke off" in record.error


async def test_a_percent_encoded_path_is_checked_as_the_backend_will_read_it(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    big = {**CHAT, "max_tokens": 99999}
    async with client.post(proxy.url("/v1/%63hat/completions"), json=big, headers=bearer(key)) as r:
        assert r.status == 200, await r.text()
    seen = proxy.upstream.seen[-1]
    assert seen.path == "/v1/chat/completions"
    assert json.loads(seen.body)["max_tokens"] == 1024  # capped, as for the plain path
    # An encoded slash is no path separator: no route, and nothing reaches the backend.
    async with client.post(proxy.url("/v1/chat%2Fcompletions"), json=big, headers=bearer(key)) as r:
        assert r.status == 404
    assert len(proxy.upstream.seen) == 1
    records = await proxy.wait_for_records(2)
    assert [(r.prompt_tokens, r.completion_tokens) for r in records] == [(5, 2), (None, None)]


async def test_deeply_nested_json_is_a_400_not_a_500(
    proxy: Harness, client: aiohttp.ClientSession
) -> None:
    key = await proxy.user("alice")
    nested = b"[" * 1900 + b"]" * 1900  # under the cap of 4096 bytes, over any recursion limit
    async with client.post(
        proxy.url("/v1/chat/completions"),
        data=nested,
        headers={**bearer(key), "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400
        assert "nested too deeply" in (await r.json())["error"]["message"]
