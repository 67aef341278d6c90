"""The local-server REST API: /stream's text events, each user's own default model
(/setModel), the prompt cache warm-up (/restore_cache), and the keyless status document (GET /)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import BACKEND_KEY, Harness, bearer, random_key, running_proxy
from tests.test_jsonrpc import call, chats, rpc

MODELS = ["alpha", "beta"]


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


@pytest.fixture
async def two_models(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, models=MODELS)
    async with running_proxy(db_dsn, tmp_path, upstream) as harness:
        yield harness


async def post(
    proxy: Harness, path: str, key: str | None, body: Any
) -> tuple[int, bytes, dict[str, str]]:
    """The status, the body as far as it came (a cut stream ends early) and the headers."""
    headers = bearer(key) if key else {}
    received = b""
    async with (
        aiohttp.ClientSession() as client,
        client.post(proxy.url(path), json=body, headers=headers) as r,
    ):
        try:
            async for chunk in r.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            pass  # the connection was cut: what came is what the client has
        return r.status, received, dict(r.headers)


def events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payload of each `data:` event of an SSE body."""
    return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]


# -- POST /stream ---------------------------------------------------------------------------------


async def test_stream_sends_text_deltas_then_the_finish_reason_and_usage(proxy: Harness) -> None:
    key = await proxy.user("alice")
    body = {"message": "Hi", "history": [{"role": "system", "content": "Be brief."}],
            "max_new_tokens": 7, "temperature": 0.5}  # fmt: skip
    status, raw, headers = await post(proxy, "/stream", key, body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    sent = events(raw)
    assert sent[:2] == [{"delta": "Hello"}, {"delta": " world"}]
    assert sent[2] == {
        "done": True,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "model": MODEL,
    }
    assert len(sent) == 3
    (asked,) = chats(proxy)
    assert asked["max_tokens"] == 7
    assert asked["temperature"] == 0.5
    assert [m["role"] for m in asked["messages"]] == ["system", "user"]
    (row,) = await proxy.wait_for_records(1)
    assert (row.path, row.method, row.status_code, row.stream) == ("/stream", "POST", 200, True)
    assert (row.prompt_tokens, row.completion_tokens) == (5, 2)


async def test_stream_errors_are_events_too(db_dsn: str, tmp_path: Path) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, mode="end-mid-stream")
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await proxy.user("alice")
        refused = await post(proxy, "/stream", random_key(), {"message": "Hi"})
        invalid = await post(proxy, "/stream", key, {"message": "Hi", "temperature": "hot"})
        broken = await post(proxy, "/stream", key, {"message": "Hi"})
    assert refused[0] == 401
    assert events(refused[1])[0]["code"] == "invalid_api_key"
    assert invalid[0] == 400
    (error,) = events(invalid[1])
    assert error["param"] == "temperature"
    assert "temperature" in error["error"]
    assert broken[0] == 200  # the stream had begun
    *text, last = events(broken[1])
    assert text == [{"delta": "Hello"}]
    assert "broke off" in last["error"]


async def test_stream_needs_a_message_or_a_history(proxy: Harness) -> None:
    key = await proxy.user("alice")
    status, raw, _ = await post(proxy, "/stream", key, {"max_new_tokens": 3})
    assert status == 400
    assert events(raw)[0]["param"] == "message"


async def test_stream_accepts_tool_results_but_does_not_process_them(proxy: Harness) -> None:
    # /stream takes create_message's body, tool_results included, and leaves them out: the
    # model sees the history and the message only, and answers in text.
    key = await proxy.user("alice")
    asked = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo"}}
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [asked]},
    ]
    answered = [{"tool_call_id": "call_1", "content": {"celsius": 3}}]
    body = {"history": history, "message": "Well?", "tool_results": answered,
            "tools": [{"name": "get_weather"}]}  # fmt: skip
    status, raw, _ = await post(proxy, "/stream", key, body)
    # Not checked either: results naming no call of the history, in any shape, pass unread.
    anything = {"message": "Hi", "tool_results": [{"tool_call_id": "nope"}, 7]}
    unchecked = await post(proxy, "/stream", key, anything)
    # Nor are they a turn of their own: without a message or a history there is nothing to say.
    alone = await post(proxy, "/stream", key, {"tool_results": answered})
    first, second = chats(proxy)
    rows = await proxy.wait_for_records(3)
    assert status == 200
    assert [e.get("delta") for e in events(raw)] == ["Hello", " world", None]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user"]
    assert "celsius" not in json.dumps(first)
    assert first["tool_choice"] == "none"  # the tools stay in the prompt; the answer is text
    assert unchecked[0] == 200
    assert second["messages"] == [{"role": "user", "content": "Hi"}]
    assert alone[0] == 400
    assert events(alone[1])[0]["param"] == "message"
    assert [(r.path, r.status_code) for r in rows] == [("/stream", 200)] * 2 + [("/stream", 400)]


# -- POST /setModel -------------------------------------------------------------------------------


async def test_each_user_has_their_own_default_model(two_models: Harness) -> None:
    proxy = two_models
    alice, bob, carol = [await proxy.user(name) for name in ("alice", "bob", "carol")]
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    # alice's key is cached before her choice: the choice still applies at once.
    await post(proxy, "/v1/chat/completions", alice, chat)
    status, raw, _ = await post(proxy, "/setModel", alice, {"modelName": "beta.gguf"})
    assert status == 200
    assert json.loads(raw)["modelName"] == "beta"
    assert (await post(proxy, "/setModel", bob, {"modelName": "alpha"}))[0] == 200
    before = len(chats(proxy))
    for key in (alice, bob, carol):
        assert (await post(proxy, "/v1/chat/completions", key, chat))[0] == 200
        assert "result" in (await rpc(proxy, key, call(params={"message": "Hi"}, id=1)))[1]
        assert (await post(proxy, "/stream", key, {"message": "Hi"}))[0] == 200
    named = [body.get("model") for body in chats(proxy)[before:]]
    assert named == ["beta"] * 3 + ["alpha"] * 3 + [None] * 3
    # A model named in the request wins over the default.
    await post(proxy, "/v1/chat/completions", alice,
               {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert chats(proxy)[-1]["model"] == "alpha"
    rows = await proxy.wait_for_records(13)
    models = {(r.username, r.model) for r in rows if r.path in ("/rpc", "/stream")}
    # carol named none and has no default of her own: the server's default served her
    assert models == {("alice", "beta"), ("bob", "alpha"), ("carol", "alpha")}
    set_model = [r for r in rows if r.path == "/setModel"]
    assert [(r.username, r.status_code) for r in set_model] == [("alice", 200), ("bob", 200)]


async def test_set_model_refuses_an_unknown_name_listing_the_models(two_models: Harness) -> None:
    key = await two_models.user("alice")
    status, raw, _ = await post(two_models, "/setModel", key, {"modelName": "gamma.gguf"})
    assert status == 404
    body = json.loads(raw)
    assert body["code"] == "model_not_found"
    assert body["models"] == MODELS
    assert "alpha, beta" in body["error"]
    status, raw, _ = await post(two_models, "/setModel", key, {"model": "alpha"})
    assert status == 400
    assert json.loads(raw)["param"] == "modelName"


async def test_set_model_null_goes_back_to_the_servers_default(two_models: Harness) -> None:
    key = await two_models.user("alice")
    await post(two_models, "/setModel", key, {"modelName": "BETA"})  # any case, when unambiguous
    status, raw, _ = await rpc(two_models, key, call("list_models", id=1))
    assert raw["result"] == {"models": MODELS, "default": "beta", "your_default": "beta"}
    status, raw, _ = await post(two_models, "/setModel", key, {"modelName": None})
    assert (status, json.loads(raw)["default"]) == (200, "alpha")
    await post(two_models, "/stream", key, {"message": "Hi"})
    assert "model" not in chats(two_models)[-1]


async def test_set_model_asks_a_backend_that_does_not_name_its_models(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, models=MODELS, plain=True)
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await proxy.user("alice")
        unknown = await post(proxy, "/setModel", key, {"modelName": "gamma"})
        known = await post(proxy, "/setModel", key, {"modelName": "beta"})
        listed = [s.path for s in upstream.seen]
    assert unknown[0] == 404
    assert json.loads(unknown[1])["models"] == MODELS
    assert known[0] == 200
    assert listed == ["/v1/models", "/v1/models"]  # a fair turn each, like any request


# -- POST /restore_cache --------------------------------------------------------------------------


async def test_restore_cache_has_the_backend_read_the_prefix_and_says_what_is_cached(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, cached_tokens=3)
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await proxy.user("alice", rate_limit=1)
        conversation = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
        body = {"messages": conversation, "tools": [{"name": "f"}]}
        status, raw, _ = await post(proxy, "/restore_cache", key, body)
        again = await post(proxy, "/restore_cache", key, body)
        rows = await proxy.wait_for_records(2)
    assert status == 200
    assert json.loads(raw) == {"cached_tokens": 5, "reused_tokens": 3, "model": MODEL}
    (asked,) = chats(proxy)
    assert asked["max_tokens"] == 1  # nothing meaningful generated
    assert asked["tool_choice"] == "none"
    assert asked["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert [m["content"] for m in asked["messages"]] == [m["content"] for m in conversation]
    assert again[0] == 429  # rate limited like any request
    assert json.loads(again[1])["code"] == "rate_limit_exceeded"
    assert json.loads(again[1])["retry_after"] >= 1
    assert [(r.path, r.status_code, r.prompt_tokens) for r in rows] == [
        ("/restore_cache", 200, 5),
        ("/restore_cache", 429, None),
    ]


async def test_restore_cache_waits_its_fair_turn(db_dsn: str, tmp_path: Path) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=asyncio.Event())
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        async with aiohttp.ClientSession() as client:
            holding = await client.post(
                proxy.url("/stream"), json={"message": "long"}, headers=bearer(alice)
            )
            await upstream.received.wait()
            warm = asyncio.create_task(
                post(proxy, "/restore_cache", bob, {"messages": [{"role": "user", "content": "x"}]})
            )
            await asyncio.sleep(0.3)
            assert not warm.done()  # queued behind alice's stream on the one slot
            assert upstream.gate is not None
            upstream.gate.set()
            await holding.read()
            holding.release()
            status, _, _ = await warm
        rows = await proxy.wait_for_records(2)
    assert status == 200
    (warm_row,) = [r for r in rows if r.path == "/restore_cache"]
    assert warm_row.queue_ms is not None
    assert warm_row.queue_ms >= 250


# -- GET / ----------------------------------------------------------------------------------------


async def test_the_status_document_needs_no_key_and_names_no_user(proxy: Harness) -> None:
    await proxy.user("alice")
    async with aiohttp.ClientSession() as client, client.get(proxy.url("/")) as r:
        assert r.status == 200
        body = await r.json()
    assert body["name"] == "llama-gate"
    assert body["version"] == "0.1.0"
    assert body["ready"] is True
    assert body["models"] == [MODEL]
    assert body["default_model"] == MODEL
    assert body["apis"] == {
        "openai": "/v1",
        "jsonrpc": "/rpc",
        "stream": "/stream",
        "models": "/models",
        "set_model": "/setModel",
        "restore_cache": "/restore_cache",
    }
    assert "alice" not in json.dumps(body)
    await asyncio.sleep(0.1)
    assert proxy.records == []  # a probe, not an API request


async def test_every_api_the_status_document_names_is_served_there(proxy: Harness) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url("/")) as r:
            apis = (await r.json())["apis"]
        # Asked without a key: a path that is served asks for one, any other is unknown.
        answers = {}
        for name, path in apis.items():
            if name == "openai":  # a prefix: its model list lies under it
                path += "/models"
            method = "GET" if path.endswith("/models") else "POST"
            async with client.request(method, proxy.url(path)) as r:
                answers[name] = r.status
        async with client.post(proxy.url("/nowhere")) as r:
            unknown = r.status
    assert answers == dict.fromkeys(apis, 401)
    assert unknown == 404


async def test_get_models_keeps_working(two_models: Harness) -> None:
    key = await two_models.user("alice")
    async with (
        aiohttp.ClientSession() as client,
        client.get(two_models.url("/models"), headers=bearer(key)) as r,
    ):
        listed = await r.json()
    assert [m["id"] for m in listed["data"]] == MODELS
    # Its row names the API by its route's own path, /v1/models, as for the OpenAI SDK's call.
    (row,) = await two_models.wait_for_records(1)
    assert (row.method, row.path, row.status_code, row.username) == (
        "GET", "/v1/models", 200, "alice",
    )  # fmt: skip
