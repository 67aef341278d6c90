"""The measure step: prompts counted before their turn when it can matter; what does not fit is
a 400 in each API's shape that spent nothing (no rate admission, no turn, no model time)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import BACKEND_KEY, Harness, bearer, running_proxy
from tests.sharing_helpers import set_limits

N_CTX = 400  # the fake's context: prompt_size (the JSON length of messages and tools) counts
LONG = "x" * 500  # a message that cannot fit whatever else the request holds
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, n_ctx=N_CTX)
    async with running_proxy(db_dsn, tmp_path, upstream, MAX_TOKENS_HARD_CAP="100") as harness:
        yield harness


def _chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def _post(
    client: aiohttp.ClientSession, proxy: Harness, path: str, body: Any, key: str
) -> tuple[int, Any]:
    async with client.post(proxy.url(path), json=body, headers=bearer(key)) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


def _model_requests(proxy: Harness) -> list[str]:
    return [seen.path for seen in proxy.upstream.seen if seen.path != "/v1/models"]


async def test_a_prompt_past_the_context_is_a_400_in_each_apis_shape_that_spends_nothing(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice", rate_limit=1)  # one admission: a refusal must not take it
    rpc = {"jsonrpc": "2.0", "id": 7, "method": "create_message", "params": {"message": LONG}}
    anthropic = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": LONG}]}
    async with aiohttp.ClientSession() as client:
        answers = {
            "openai": await _post(client, proxy, CHAT_PATH, _chat(LONG), key),
            "openai stream": await _post(client, proxy, CHAT_PATH, _chat(LONG, stream=True), key),
            "anthropic": await _post(client, proxy, "/v1/messages", anthropic, key),
            "anthropic stream": await _post(
                client, proxy, "/v1/messages", {**anthropic, "stream": True}, key
            ),
            "rpc": await _post(client, proxy, "/rpc", rpc, key),
            "stream": await _post(client, proxy, "/stream", {"message": LONG}, key),
            "restore_cache": await _post(
                client, proxy, "/restore_cache", {"messages": [{"role": "user", "content": LONG}]},
                key,
            ),
        }  # fmt: skip
        served = await _post(client, proxy, CHAT_PATH, _chat("Hi"), key)
    for name in ("openai", "openai stream"):
        status, body = answers[name]
        assert status == 400, name
        assert body["error"]["code"] == "context_length_exceeded"
        assert body["error"]["param"] == "messages"
        assert f"maximum context length is {N_CTX} tokens" in body["error"]["message"]
    for name in ("anthropic", "anthropic stream"):  # a plain answer, never a 200 that breaks
        status, body = answers[name]
        assert status == 400, name
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("prompt is too long: ")
        assert f"tokens > {N_CTX - 50} maximum" in body["error"]["message"]
    status, body = answers["rpc"]
    assert status == 200
    assert body["error"]["code"] == -32602
    assert body["error"]["data"]["code"] == "context_length_exceeded"
    status, body = answers["stream"]
    assert status == 400
    assert json.loads(body.removeprefix("data: "))["code"] == "context_length_exceeded"
    status, body = answers["restore_cache"]
    assert (status, body["code"]) == (400, "context_length_exceeded")
    # Nothing reached the model, and the one rate admission was left for the real request.
    assert served[0] == 200
    assert _model_requests(proxy) == [CHAT_PATH]


async def test_small_prompts_are_not_measured_unless_a_quota_needs_the_figure(
    proxy: Harness,
) -> None:
    alice, bob = await proxy.user("alice"), await proxy.user("bob")
    await set_limits(proxy.dsn, "bob", tokens_per_minute=100_000)
    async with aiohttp.ClientSession() as client:
        assert (await _post(client, proxy, CHAT_PATH, _chat("Hi"), alice))[0] == 200
        assert proxy.upstream.measured == []  # no extra round trip for what cannot overflow
        assert (await _post(client, proxy, CHAT_PATH, _chat("Hi"), bob))[0] == 200
        assert len(proxy.upstream.measured) == 1
        # Large enough that it might not fit: measured (it does fit, and is served).
        fits = _chat("y" * 250)
        assert (await _post(client, proxy, CHAT_PATH, fits, alice))[0] == 200
        assert len(proxy.upstream.measured) == 2


async def test_a_text_that_cannot_fit_is_refused_without_asking_the_backend(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    huge = "z" * (N_CTX * 16 + 100)  # the fake's longest token is 16 bytes
    async with aiohttp.ClientSession() as client:
        status, body = await _post(client, proxy, CHAT_PATH, _chat(huge), key)
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert "at least" in body["error"]["message"]
    assert proxy.upstream.measured == []
    assert _model_requests(proxy) == []


async def test_the_answer_has_the_room_it_asked_for_or_whatever_the_context_has_left(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    text = "w" * 250  # about 300 of the fake's 400 tokens: ~100 left for the answer
    async with aiohttp.ClientSession() as client:
        # Asked for 90 (within the cap of 100), and no room for them: refused, as OpenAI does.
        status, body = await _post(client, proxy, CHAT_PATH, _chat(text, max_tokens=90), key)
        assert status == 400
        assert "for the answer" in body["error"]["message"]
        # Asked for nothing (or more than the cap): served with what the context has left.
        assert (await _post(client, proxy, CHAT_PATH, _chat(text), key))[0] == 200
        answer = await _post(client, proxy, CHAT_PATH, _chat(text, max_tokens=5000), key)
        assert answer[0] == 200
    sent = [json.loads(seen.body)["max_tokens"] for seen in proxy.upstream.seen]
    prompt = json.loads(proxy.upstream.measured[-1])
    room = N_CTX - len(json.dumps({"messages": prompt["messages"], "tool_choice": None,
                                   "tools": None}, sort_keys=True))  # fmt: skip
    assert 0 < room < 100
    assert sent == [room, room]


async def test_embeddings_are_bounded_in_inputs_and_tokens(db_dsn: str, tmp_path: Path) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, n_ctx=N_CTX)
    settings = {"LLAMA_PROXY_MAX_EMBEDDING_INPUTS": "4", "LLAMA_PROXY_MAX_EMBEDDING_TOKENS": "50"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:
        key = await proxy.user("alice")
        await set_limits(db_dsn, "alice", tokens_per_minute=1000)  # so every request is measured
        async with aiohttp.ClientSession() as client:
            many = await _post(client, proxy, "/v1/embeddings", {"input": ["a"] * 5}, key)
            long = await _post(client, proxy, "/v1/embeddings", {"input": ["b" * 30] * 2}, key)
            fine = await _post(client, proxy, "/v1/embeddings", {"input": ["c" * 20] * 2}, key)
        rows = await proxy.wait_for_records(3)
    assert many[0] == long[0] == 400
    assert (many[1]["error"]["param"], many[1]["error"]["code"]) == ("input", "request_too_large")
    assert "at most 4" in many[1]["error"]["message"]
    assert "60 tokens in all" in long[1]["error"]["message"]
    assert fine[0] == 200
    assert [seen.path for seen in proxy.upstream.seen] == ["/v1/embeddings"]
    assert [row.status_code for row in rows] == [400, 400, 200]


async def test_count_tokens_takes_no_turn_at_the_model(proxy: Harness) -> None:
    alice, bob = await proxy.user("alice"), await proxy.user("bob")
    proxy.upstream.gate = asyncio.Event()  # alice's stream holds the one slot
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as client:
        holder = await client.post(
            proxy.url(CHAT_PATH), json=_chat("Hi", stream=True), headers=bearer(alice)
        )
        await holder.content.readany()
        async with asyncio.timeout(5):  # answered while the model is busy
            status, counted = await _post(client, proxy, "/v1/messages/count_tokens", body, bob)
        holder.close()
    assert status == 200
    assert counted == {"input_tokens": len(json.dumps(
        {"messages": body["messages"], "tool_choice": None, "tools": None}, sort_keys=True
    ))}  # fmt: skip


async def test_an_unknown_model_is_refused_before_any_admission_on_every_api(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice", rate_limit=1)
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "create_message",
           "params": {"message": "Hi", "model": "nope"}}  # fmt: skip
    messages = [{"role": "user", "content": "Hi"}]
    async with aiohttp.ClientSession() as client:
        refused = [
            await _post(client, proxy, CHAT_PATH, {**_chat("Hi"), "model": "nope"}, key),
            await _post(client, proxy, "/v1/embeddings", {"model": "nope", "input": "x"}, key),
            await _post(client, proxy, "/v1/messages",
                        {"model": "nope", "max_tokens": 5, "messages": messages}, key),
            await _post(client, proxy, "/stream", {"message": "Hi", "model": "nope"}, key),
            await _post(client, proxy, "/restore_cache", {"messages": messages, "model": "nope"},
                        key),
        ]  # fmt: skip
        rpc_answer = await _post(client, proxy, "/rpc", rpc, key)
        served = await _post(client, proxy, CHAT_PATH, _chat("Hi"), key)
    assert [status for status, _ in refused] == [404] * 5
    assert rpc_answer[1]["error"]["code"] == -32004
    assert served[0] == 200  # the one rate admission was still there
    assert _model_requests(proxy) == [CHAT_PATH]


async def test_a_measured_prompt_is_charged_when_the_backend_fails_after_reading_it(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    await set_limits(proxy.dsn, "alice", tokens_per_minute=100_000)
    proxy.upstream.mode = "close-before-headers"  # it took the request, then died
    async with aiohttp.ClientSession() as client:
        status, _ = await _post(client, proxy, CHAT_PATH, _chat("Hi"), key)
    (row,) = await proxy.wait_for_records(1)
    assert (status, row.status_code) == (502, 502)
    measured = json.loads(proxy.upstream.measured[0])
    assert row.prompt_tokens == len(json.dumps(
        {"messages": measured["messages"], "tool_choice": None, "tools": None}, sort_keys=True
    ))  # fmt: skip
