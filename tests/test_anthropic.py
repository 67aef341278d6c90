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

from proxy.dialects import anthropic as messages_endpoint
from proxy.dialects.anthropic_errors import DIALECT, error_event
from proxy.dialects.anthropic_replies import Pinger
from proxy.errors import ApiError, InternalError
from tests.fake_upstream import prompt_size
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


async def _events(proxy: Harness, key: str, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    """A streamed message's raw server-sent events, as (event name, data) pairs."""
    body = {"model": MODEL, "max_tokens": 50, "messages": HI, **body, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url("/v1/messages"), json=body, headers={"x-api-key": key}) as r,
    ):
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        raw = (await r.read()).decode()
    events = []
    for block in raw.split("\n\n")[:-1]:
        match = re.fullmatch(r"event: (\w+)\ndata: (.*)", block)
        assert match is not None, block
        name, data = match.groups()
        events.append((name, json.loads(data)))
        assert events[-1][1]["type"] == name  # every event's data names it too
    assert raw.endswith("\n\n")
    return events


async def test_a_message_with_the_sync_and_async_sdk_with_or_without_v1(proxy: Harness) -> None:
    key = await proxy.user("alice")
    for base in ("/", "/v1"):  # clients are configured both ways
        with anthropic.Anthropic(base_url=proxy.url(base), api_key=key, max_retries=0) as client:
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
                extra_body={
                    "temperature": 0.5,
                    "top_k": 5,
                    "service_tier": "auto",
                    "container": None,
                },
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


async def test_a_bearer_key_is_accepted_as_the_x_api_key_is(proxy: Harness) -> None:
    key = await proxy.user("alice")
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url("/v1/messages"), json=body, headers=bearer(key)) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["content"] == [{"type": "text", "text": "Hello world"}]
        # The Bearer key is the one read: a good x-api-key does not rescue a wrong one.
        wrong = {**bearer("lgk_wrong"), "x-api-key": key}
        async with http.post(proxy.url("/v1/messages"), json=body, headers=wrong) as r:
            assert r.status == 401
            refusal = await r.json()
        assert refusal["error"]["type"] == "authentication_error"
    # The SDK's auth_token= (ANTHROPIC_AUTH_TOKEN) sends the key as a Bearer token.
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url("/"), auth_token=key, max_retries=0, timeout=10
    ) as client:
        assert client.api_key is None
        sdk_answer = await client.messages.create(**body)
    assert sdk_answer.content[0].type == "text"
    rows = await proxy.wait_for_records(3)
    assert [(r.username, r.status_code) for r in rows] == [
        ("alice", 200), (None, 401), ("alice", 200),
    ]  # fmt: skip


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
    # The turn came at once: no ping (one comes only after PING_SECONDS of waiting).
    assert names == [
        "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = json.loads(events[0][1])
    assert start["message"]["usage"]["input_tokens"] == 5  # known before the first token
    delta = json.loads(events[-2][1])
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 5, "output_tokens": 2,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }  # fmt: skip
    rows = await proxy.wait_for_records(2)
    assert [(r.status_code, r.stream, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (200, True, 5, 2)
    ] * 2


async def test_a_streamed_tool_call_arrives_as_input_json_deltas(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = []
    proxy.upstream.tool_calls = [{"id": "call.7:x", "name": "get_weather",
                                  "arguments": {"city": "Paris"}}]  # fmt: skip
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    events = await _events(proxy, key, tools=tools)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "call_7_x", "name": "get_weather",
                          "input": {}},
    }  # fmt: skip
    deltas = [data["delta"] for _, data in events[2:4]]
    assert [d["type"] for d in deltas] == ["input_json_delta"] * 2  # as the backend sent them
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
    assert {data["index"] for _, data in events[1:5]} == {0}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


async def test_streamed_reasoning_arrives_as_thinking_deltas_then_text(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = ["<think>\nIs it 6", " or 7? 2 * 3 = 6.\n</thi", "nk>\n\nIt", " is 6."]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    events = await _events(proxy, key, thinking=thinking)
    blocks = [(d["index"], d["content_block"]) for n, d in events if n == "content_block_start"]
    assert blocks == [(0, {"type": "thinking", "thinking": ""}), (1, {"type": "text", "text": ""})]
    deltas = [(d["index"], d["delta"]) for n, d in events if n == "content_block_delta"]
    assert {(i, d["type"]) for i, d in deltas} == {(0, "thinking_delta"), (1, "text_delta")}
    assert "".join(d["thinking"] for i, d in deltas if i == 0) == "Is it 6 or 7? 2 * 3 = 6.\n"
    assert "".join(d["text"] for i, d in deltas if i == 1) == "It is 6."
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1]
    # Without thinking enabled, the reasoning is not streamed at all.
    plain = await _events(proxy, key)
    assert {d["delta"]["type"] for n, d in plain if n == "content_block_delta"} == {"text_delta"}


@pytest.mark.parametrize("mode", ["close-mid-stream", "end-mid-stream"])
async def test_a_backend_failing_mid_stream_ends_it_with_an_api_error_event(
    proxy: Harness, mode: str
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode = mode
    events = await _events(proxy, key)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert "message_stop" not in names
    assert names[-1] == "error"
    error = events[-1][1]
    assert set(error) == {"type", "error"}
    assert error["error"]["type"] == "api_error"
    assert error["error"]["message"].endswith("; try again.")
    (row,) = await proxy.wait_for_records(1)
    assert row.status_code == 502
    assert row.error is not None


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


async def test_tool_results_tool_choices_and_top_p_reach_the_backend_in_openais_words(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    tools: list[Any] = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    history: list[Any] = [
        *HI,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Nod"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "rain, 8 C"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "no such city",
             "is_error": True},
        ]},
    ]  # fmt: skip
    async with _async_client(proxy, key) as client:
        await client.messages.create(
            model=MODEL, max_tokens=50, messages=history, tools=tools,
            tool_choice={"type": "auto"}, extra_body={"top_p": 0.9},  # not an SDK argument now
        )  # fmt: skip
        sent = _sent(proxy)
        await client.messages.create(
            model=MODEL, max_tokens=50, messages=HI, tools=tools, tool_choice={"type": "none"}
        )
        declined = _sent(proxy)
        await client.messages.create(
            model=MODEL, max_tokens=50, messages=HI, tool_choice={"type": "none"}
        )
        no_tools = _sent(proxy)
    assert sent["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_a", "content": "rain, 8 C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: no such city"},
    ]
    assert [c["function"]["arguments"] for c in sent["messages"][1]["tool_calls"]] == [
        '{"city": "Oslo"}', '{"city": "Nod"}',
    ]  # fmt: skip
    assert (sent["tool_choice"], sent["top_p"]) == ("auto", 0.9)
    assert "top_p" not in declined
    assert (declined["tool_choice"], len(declined["tools"])) == ("none", 1)
    assert (no_tools["tool_choice"], "tools" in no_tools) == ("none", False)


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
        whole_cut = await client.messages.create(model=MODEL, max_tokens=2, messages=HI)
        assert (whole_cut.stop_reason, whole_cut.stop_sequence) == ("max_tokens", None)
    # On the wire: the stream's message_delta names the stop sequence that matched.
    proxy.upstream.stop_sequence, proxy.upstream.finish_reason = "END", "stop"
    events = await _events(proxy, key, stop_sequences=["STOP", "END"])
    assert [name for name, _ in events[-2:]] == ["message_delta", "message_stop"]
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert _sent(proxy)["stop"] == ["STOP", "END"]


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
    proxy.upstream.sized_prompts = True  # every count depends on the whole prompt it is given
    tools: list[Any] = [{"name": "get_weather", "description": "The weather in a city.",
                         "input_schema": {"type": "object"}}]  # fmt: skip
    request: dict[str, Any] = {"model": MODEL, "messages": HI, "system": "Be brief.",
                               "tools": tools, "tool_choice": {"type": "auto"}}  # fmt: skip
    async with _async_client(proxy, key) as client:
        counted = await client.messages.count_tokens(**request)
        bare = await client.messages.count_tokens(model=MODEL, messages=HI)
        answer = await client.messages.create(max_tokens=50, **request)
        chat = _sent(proxy)
        async with client.messages.stream(max_tokens=50, **request) as stream:
            streamed = await stream.get_final_message()
    # Two counts of one prompt by the backend: equal only if both sent the same prompt.
    assert counted.input_tokens == answer.usage.input_tokens == streamed.usage.input_tokens
    assert counted.input_tokens == prompt_size(chat)
    assert bare.input_tokens < counted.input_tokens  # the system prompt and tools count
    rows = await proxy.wait_for_records(4)
    assert [(r.path, r.prompt_tokens) for r in rows] == [
        ("/v1/messages/count_tokens", None),  # counting generates nothing: no tokens spent
        ("/v1/messages/count_tokens", None),
        ("/v1/messages", counted.input_tokens),
        ("/v1/messages", counted.input_tokens),
    ]


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
    # A stopped backend is waited for 1 s (not the default 30 s) before the 529.
    settings = {
        "LLAMA_PROXY_MAX_BODY_BYTES": "2000",
        "LLAMA_PROXY_BACKEND_RESTART_WAIT_SECONDS": "1",
    }
    async with running_proxy(db_dsn, tmp_path, **settings) as proxy:
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


class _Forbidden(ApiError):
    status = 403
    code = "forbidden"


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [(_Forbidden("Not for you."), 403, "permission_error"),
     (InternalError(), 500, "api_error")],
)  # fmt: skip
def test_refusals_no_route_raises_yet_still_have_anthropics_shape(
    error: ApiError, status: int, error_type: str
) -> None:
    # No path of /v1/messages answers 403, and only a bug in the proxy answers 500 (its
    # catch-all): the shape they would have, in a whole answer and as a stream's last event.
    answer = DIALECT.error(error, "req_1")
    assert answer.status == status
    assert answer.content_type == "application/json"
    assert isinstance(answer.body, bytes)
    assert json.loads(answer.body) == {
        "type": "error",
        "error": {"type": error_type, "message": error.message},
        "request_id": "req_1",
    }
    name, data = error_event(error).decode().removesuffix("\n\n").split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error",
        "error": {"type": error_type, "message": error.message},
    }


async def test_a_backends_odd_usage_does_not_fail_the_answer(proxy: Harness) -> None:
    # Once a 500 ("the proxy failed unexpectedly") and a stream cut without an error event.
    key = await proxy.user("alice")
    proxy.upstream.usage = {"prompt_tokens": "many", "completion_tokens": 2}
    async with _async_client(proxy, key) as client:
        answer = await client.messages.create(model=MODEL, max_tokens=50, messages=HI)
    assert answer.content[0].type == "text"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (0, 2)
    events = await _events(proxy, key)
    assert [name for name, _ in events[-2:]] == ["message_delta", "message_stop"]
    assert events[-2][1]["usage"] == {
        "input_tokens": 0, "output_tokens": 2,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }  # fmt: skip
    rows = await proxy.wait_for_records(2)
    assert [(r.status_code, r.error) for r in rows] == [(200, None)] * 2


async def test_a_streamed_message_pings_while_it_waits_and_says_why_it_failed(
    db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The routes' Messages endpoints ping every PING_SECONDS (5 s), longer than this wait: a
    # quicker pinger shows that pings go on for as long as the request waits.
    every = 0.25
    monkeypatch.setattr(messages_endpoint, "Pinger", lambda d, _: Pinger(d, every))
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS="2") as proxy:
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
    pings = names.count("ping")
    assert names == ["ping"] * pings + ["error"]
    assert 2 / every - 3 <= pings <= 2 / every + 2  # one each interval of the 2 s wait
    error = json.loads(raw.rsplit("data: ", 1)[1])
    assert set(error) == {"type", "error"}
    assert error["type"] == "error"
    assert error["error"]["type"] == "overloaded_error"
    assert re.fullmatch(
        r"The model is busy: your request waited 2 s for its turn\. Try again in \d+ s, "
        r"or send fewer requests at once\.",
        error["error"]["message"],
    )
    rows = await proxy.wait_for_records(2)
    bobs = next(r for r in rows if r.username == "bob")
    assert bobs.status_code == 503
    assert str(bobs.error).startswith("queue_timeout")


# Claude Code's first request, in small: what `claude -p` 2.1 sends besides the conversation.
CLAUDE_CODE_HEADERS = {
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "mid-conversation-system-2026-04-07,effort-2025-11-24",
}


async def test_claude_codes_requests_are_accepted_as_anthropic_accepts_them(
    proxy: Harness,
) -> None:
    """A system turn inside `messages` (kept at its place), adaptive thinking, `output_config`,
    `context_management`, `cache_control` on blocks and tools, a tool parameter without a type,
    unknown fields at the top and inside blocks, `?beta=true` (the SDK's beta client): accepted,
    and nothing the backend cannot use reaches it."""
    key = await proxy.user("alice")
    cached = {"type": "ephemeral"}
    tools: list[Any] = [{
        "name": "Bash", "description": "Run a shell command.", "cache_control": cached,
        "input_schema": {"type": "object", "properties": {
            "command": {"type": "string"}, "args": {"title": "Args"}}, "required": ["command"]},
    }]  # fmt: skip
    messages: list[Any] = [
        {"role": "user", "content": [
            {"type": "text", "text": "Hi", "cache_control": cached, "citations": None}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": [{"type": "text", "text": "Be brief from now on."}]},
        {"role": "user", "content": "What is here?"},
    ]  # fmt: skip
    async with _async_client(proxy, key) as client:
        answer = await client.beta.messages.create(
            model=MODEL,
            max_tokens=32000,
            system=[{"type": "text", "text": "You are Claude Code.", "cache_control": cached}],
            messages=messages,
            tools=tools,
            thinking={"type": "adaptive"},
            extra_headers=CLAUDE_CODE_HEADERS,
            extra_body={
                "output_config": {"effort": "high"},
                "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
                "a_field_from_next_year": {"anything": True},
            },
        )
        streamed = await client.beta.messages.create(
            model=MODEL, max_tokens=100, messages=messages, tools=tools, stream=True,
            thinking={"type": "adaptive"}, extra_headers=CLAUDE_CODE_HEADERS,
        )  # fmt: skip
        kinds = [event.type async for event in streamed]
    assert answer.content[0].type == "text"
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    sent = _sent(proxy)
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("system", "Be brief from now on."),
        ("user", "What is here?"),
    ]
    first = json.loads(proxy.upstream.seen[-2].body)
    assert first["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    parameters = first["tools"][0]["function"]["parameters"]
    assert parameters["properties"]["args"] == {"title": "Args"}  # passed on; the backend serves it
    for body in (first, sent):
        text = json.dumps(body)
        for ignored in ("cache_control", "citations", "output_config", "context_management",
                        "a_field_from_next_year", "thinking"):  # fmt: skip
            assert ignored not in text
    rows = await proxy.wait_for_records(2)
    assert [(r.path, r.status_code) for r in rows] == [("/v1/messages", 200)] * 2
    assert all(r.prompt_tokens and r.completion_tokens for r in rows)
