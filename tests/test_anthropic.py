"""Anthropic's Messages API through the gateway, driven by the real `anthropic` SDK against a fake
OpenAI backend: plain and streamed messages, a tool round trip, reasoning, count_tokens, errors
in Anthropic's shape, and one audit row per request."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest

from tests.proxy_harness import Harness, bearer, running_proxy

MODEL = "smollm2-test"
HI: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        harness.upstream.event_delay = harness.upstream.tail_delay = 0.0
        yield harness


def _async_client(proxy: Harness, key: str, base: str = "") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url(base or "/"), api_key=key, max_retries=0, timeout=10
    )


def _sent(proxy: Harness) -> dict[str, Any]:
    return dict(json.loads(proxy.upstream.seen[-1].body))


async def test_a_message_with_the_sync_and_async_sdk_with_or_without_v1(proxy: Harness) -> None:
    key = await proxy.user("alice")
    for base in ("/", "/v1"):  # clients are configured both ways
        client = anthropic.Anthropic(base_url=proxy.url(base), api_key=key, max_retries=0)
        answer = await asyncio.to_thread(
            client.messages.create,
            model=MODEL,
            max_tokens=50,
            system=[{"type": "text", "text": "Be brief."}],
            messages=HI,
            stop_sequences=["\n\n"],
            metadata={"user_id": "end-user-7"},
            extra_headers={"anthropic-beta": "some-future-flag"},
            # Sampling fields (older SDKs' own arguments) and fields without use here.
            extra_body={"temperature": 0.5, "top_k": 5, "service_tier": "auto", "container": None},
        )
        assert answer.type == "message"
        assert re.fullmatch(r"msg_\w+", answer.id)
        assert answer.role == "assistant"
        assert answer.model == MODEL
        assert [(b.type, getattr(b, "text", None)) for b in answer.content] == [
            ("text", "Hello world")
        ]
        assert (answer.stop_reason, answer.stop_sequence) == ("end_turn", None)
        assert (answer.usage.input_tokens, answer.usage.output_tokens) == (5, 2)
    sent = _sent(proxy)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["top_k"]) == (
        50, ["\n\n"], 0.5, 5,
    )  # fmt: skip
    async with _async_client(proxy, key) as client:
        answer = await client.messages.create(model=MODEL, max_tokens=5000, messages=HI)
    assert answer.content[0].type == "text"
    assert _sent(proxy)["max_tokens"] == 1024  # capped like everywhere
    rows = await proxy.wait_for_records(3)
    assert [(r.path, r.status_code, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("/v1/messages", 200, 5, 2)
    ] * 3
    assert [r.end_user for r in rows] == ["end-user-7", "end-user-7", None]
    assert rows[0].model == MODEL


async def test_a_streamed_message_follows_anthropics_event_sequence(proxy: Harness) -> None:
    key = await proxy.user("alice")
    async with (
        _async_client(proxy, key) as client,
        client.messages.stream(model=MODEL, max_tokens=50, messages=HI) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds
    assert final.content[0].type == "text"
    assert final.content[0].text == "Hello world"
    assert final.usage.output_tokens == 2
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.url("/v1/messages"),
            json={"model": MODEL, "max_tokens": 50, "messages": HI, "stream": True},
            headers={"x-api-key": key},
        ) as r,
    ):
        raw = (await r.read()).decode()
    events = re.findall(r"event: (\w+)\ndata: (.*)\n", raw)
    names = [name for name, _ in events]
    assert names == [
        "ping", "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = json.loads(events[1][1])
    assert start["message"]["usage"]["input_tokens"] == 5  # known before the first token
    delta = json.loads(events[-2][1])
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 5, "output_tokens": 2}
    rows = await proxy.wait_for_records(2)
    assert [(r.status_code, r.stream, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (200, True, 5, 2)
    ] * 2


async def test_a_tool_round_trip(proxy: Harness) -> None:
    key = await proxy.user("alice")
    tools: list[Any] = [{
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }]  # fmt: skip
    proxy.upstream.pieces = []
    proxy.upstream.tool_calls = [{"id": "call.7:x", "name": "get_weather",
                                  "arguments": {"city": "Paris"}}]  # fmt: skip
    async with _async_client(proxy, key) as client:
        first = await client.messages.create(
            model=MODEL, max_tokens=100, messages=HI, tools=tools,
            tool_choice={"type": "any"},
        )  # fmt: skip
        assert first.stop_reason == "tool_use"
        (use,) = first.content
        assert use.type == "tool_use"
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", use.id)
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        sent = _sent(proxy)
        assert sent["tool_choice"] == "required"
        assert sent["tools"][0]["function"]["parameters"]["properties"] == {
            "city": {"type": "string"}
        }
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=HI, tools=tools,
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream:  # fmt: skip
            streamed = await stream.get_final_message()
        assert streamed.content[0].type == "tool_use"
        assert streamed.content[0].input == {"city": "Paris"}
        assert _sent(proxy)["tool_choice"] == {
            "type": "function",
            "function": {"name": "get_weather"},
        }
        proxy.upstream.tool_calls, proxy.upstream.pieces = [], ["It is sunny."]
        history: list[Any] = [
            *HI,
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm",
                                               "signature": "x"},
                                              {"type": "text", "text": "Let me look."},
                                              use.model_dump()]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id,
                 "content": [{"type": "text", "text": "sunny, 21 C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ]  # fmt: skip
        final = await client.messages.create(
            model=MODEL, max_tokens=100, messages=history, tools=tools
        )
    assert final.content[0].type == "text"
    assert final.stop_reason == "end_turn"
    assert _sent(proxy)["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.",
         "tool_calls": [{"id": use.id, "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip


async def test_stop_sequences_and_max_tokens_are_named_as_anthropic_does(proxy: Harness) -> None:
    key = await proxy.user("alice")
    async with _async_client(proxy, key) as client:
        proxy.upstream.stop_sequence = "END"
        stopped = await client.messages.create(
            model=MODEL, max_tokens=50, messages=HI, stop_sequences=["STOP", "END"]
        )
        assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "END")
        proxy.upstream.stop_sequence, proxy.upstream.finish_reason = None, "length"
        async with client.messages.stream(model=MODEL, max_tokens=2, messages=HI) as stream:
            cut = await stream.get_final_message()
        assert (cut.stop_reason, cut.stop_sequence) == ("max_tokens", None)


THINK = "<think>\nIs it 6 or 7? 2 * 3 = 6.\n</think>\n\nIt is 6."


@pytest.mark.parametrize("cut", range(1, len(THINK), 3))
async def test_reasoning_becomes_thinking_blocks_wherever_the_stream_breaks(
    proxy: Harness, cut: int
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = [THINK[:cut], THINK[cut:]]
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    async with _async_client(proxy, key) as client:
        async with client.messages.stream(
            model=MODEL, max_tokens=50, messages=HI, thinking=thinking
        ) as stream:
            streamed = await stream.get_final_message()
        whole = await client.messages.create(
            model=MODEL, max_tokens=50, messages=HI, thinking=thinking
        )
        dropped = await client.messages.create(model=MODEL, max_tokens=50, messages=HI)
    for message in (streamed, whole):
        assert [b.type for b in message.content] == ["thinking", "text"], cut
        assert message.content[0].thinking == "Is it 6 or 7? 2 * 3 = 6.\n"
        assert message.content[1].text == "It is 6."
    assert [(b.type, b.text) for b in dropped.content] == [("text", "It is 6.")]


async def test_the_think_route_keeps_reasoning_inline_and_clean_drops_it(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = [THINK]
    body = {"model": MODEL, "max_tokens": 50, "messages": HI,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for path, expected in (
            ("/v1/messages/think", [("text", THINK)]),  # exactly as generated
            ("/v1/messages/clean", [("text", "It is 6.")]),  # though thinking was enabled
        ):
            async with http.post(proxy.url(path), json=body, headers={"x-api-key": key}) as r:
                answer = await r.json()
            assert [(b["type"], b["text"]) for b in answer["content"]] == expected, path
    rows = await proxy.wait_for_records(2)
    assert [r.path for r in rows] == ["/v1/messages/think", "/v1/messages/clean"]


async def test_count_tokens_is_what_the_message_then_reports(proxy: Harness) -> None:
    key = await proxy.user("alice")
    async with _async_client(proxy, key) as client:
        counted = await client.messages.count_tokens(model=MODEL, messages=HI, system="Be brief.")
        answer = await client.messages.create(
            model=MODEL, max_tokens=50, messages=HI, system="Be brief."
        )
    assert counted.input_tokens == answer.usage.input_tokens == 5
    counting = next(s for s in proxy.upstream.seen if s.path == "/llama-gate/prompt-tokens")
    assert json.loads(counting.body)["messages"][0] == {"role": "system", "content": "Be brief."}
    rows = await proxy.wait_for_records(2)
    assert [r.path for r in rows] == ["/v1/messages/count_tokens", "/v1/messages"]


@pytest.mark.parametrize(
    ("status", "error_type", "exception"),
    [
        (401, "authentication_error", anthropic.AuthenticationError),
        (400, "invalid_request_error", anthropic.BadRequestError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.APIStatusError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (529, "overloaded_error", anthropic.APIStatusError),
        (502, "api_error", anthropic.APIStatusError),
    ],
)
async def test_errors_come_in_anthropics_shape(
    db_dsn: str, tmp_path: Path, status: int, error_type: str, exception: type[Exception]
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_BODY_BYTES="2000") as proxy:
        key = await proxy.user("alice", rate_limit=1)
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "messages": HI}
        url, headers = proxy.url("/v1/messages"), {"x-api-key": key, "anthropic-version": "x"}
        if status == 401:
            headers = {"x-api-key": "lgk_wrong"}
        elif status == 400:
            image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
            body["messages"] = [{"role": "user", "content": [{"type": "image", "source": image}]}]
        elif status == 404:
            url = proxy.url("/v1/messages/nowhere")
        elif status == 413:
            body["messages"] = [{"role": "user", "content": "x" * 3000}]
        elif status == 429:
            async with aiohttp.ClientSession() as http:
                await (await http.post(url, json=body, headers=headers)).read()
        elif status == 529:
            await proxy.upstream.stop()
        elif status == 502:
            proxy.upstream.mode = "error"
        async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
            answer = await r.json()
            assert r.status == status, answer
            if status == 429:
                assert int(r.headers["retry-after"]) >= 1
        assert answer["type"] == "error"
        assert answer["error"]["type"] == error_type
        assert answer["request_id"]
        if status == 401:
            assert "x-api-key" in answer["error"]["message"]
        if status == 400:
            assert "cannot see images" in answer["error"]["message"]
        if status not in (404, 413, 429):
            async with anthropic.AsyncAnthropic(
                base_url=proxy.url("/"), api_key=headers["x-api-key"], max_retries=0
            ) as client:
                with pytest.raises(exception):
                    await client.messages.create(**body)


async def test_a_streamed_message_pings_while_it_waits_and_says_why_it_failed(
    db_dsn: str, tmp_path: Path
) -> None:
    settings = {"LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS": "2"}
    async with running_proxy(db_dsn, tmp_path, **settings) as proxy:
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        proxy.upstream.gate = asyncio.Event()  # alice's stream holds the one backend slot
        async with aiohttp.ClientSession() as http:
            holder = await http.post(
                proxy.url("/v1/chat/completions"),
                json={"model": MODEL, "messages": HI, "stream": True},
                headers=bearer(alice),
            )
            await holder.content.readany()  # its first event: it holds the slot now
            body = {"model": MODEL, "max_tokens": 10, "messages": HI, "stream": True}
            async with http.post(
                proxy.url("/v1/messages"), json=body, headers={"x-api-key": bob}
            ) as r:
                assert r.status == 200  # the stream begins while bob waits
                raw = (await r.read()).decode()
            holder.close()
    names = re.findall(r"event: (\w+)", raw)
    assert names[0] == "ping"
    assert names[-1] == "error"
    error = json.loads(raw.rsplit("data: ", 1)[1])
    assert error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": error["error"]["message"]},
    }
    assert "waited" in error["error"]["message"]
    rows = await proxy.wait_for_records(2)
    bobs = next(r for r in rows if r.username == "bob")
    assert bobs.status_code == 503
    assert str(bobs.error).startswith("queue_timeout")
