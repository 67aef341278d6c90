"""OpenAI's Responses API through the gateway, driven by the real `openai` SDK against a fake
backend: plain and streamed responses (the event sequence, sequence numbers, usage with cached
tokens), a function tool round trip, reasoning items, text.format, input_tokens, refusals in
OpenAI's shape, and one audit row per request with path /v1/responses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import BaseModel

from tests.fake_upstream import prompt_size
from tests.proxy_harness import Harness, bearer, running_proxy
from tests.sharing_helpers import set_limits

MODEL = "smollm2-test"


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        harness.upstream.event_delay = harness.upstream.tail_delay = 0.0
        yield harness


def _client(proxy: Harness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url("/v1"), api_key=key, max_retries=0, timeout=10)


def _sent(proxy: Harness, back: int = 1) -> dict[str, Any]:
    return dict(json.loads(proxy.upstream.seen[-back].body))


async def test_a_response_plain_and_streamed_gives_the_same_text_and_usage(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.cached_tokens = 3
    async with _client(proxy, key) as client:
        plain = await client.responses.create(
            model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=50,
            temperature=0.5, metadata={"ticket": "7"}, user="end-user-7",
        )  # fmt: skip
        sent = _sent(proxy)
        stream = await client.responses.create(model=MODEL, input="Hi", stream=True)
        events = [event async for event in stream]
    assert plain.object == "response"
    assert plain.id.startswith("resp_")
    assert plain.status == "completed"
    assert plain.output_text == "Hello world"
    assert plain.model == MODEL
    assert plain.metadata == {"ticket": "7"}
    assert (plain.usage.input_tokens, plain.usage.output_tokens) == (5, 2)
    assert plain.usage.input_tokens_details.cached_tokens == 3
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (sent["max_tokens"], sent["temperature"], sent["user"]) == (50, 0.5, "end-user-7")
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.output_text == "Hello world"
    assert completed.usage is not None
    assert completed.usage.input_tokens_details.cached_tokens == 3
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]  # type: ignore[union-attr]
    assert "".join(deltas) == "Hello world"
    rows = await proxy.wait_for_records(2)
    assert [(r.path, r.status_code, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("/v1/responses", 200, 5, 2)
    ] * 2
    assert [r.stream for r in rows] == [False, True]
    assert rows[0].end_user == "end-user-7"


async def test_a_function_tool_round_trip(proxy: Harness) -> None:
    key = await proxy.user("alice")
    tools: list[Any] = [{
        "type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }]  # fmt: skip
    proxy.upstream.script = [
        {"tool_calls": [{"id": "call_7", "name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"content": "It is sunny in Paris."},
    ]
    async with _client(proxy, key) as client:
        first = await client.responses.create(
            model=MODEL, input="Weather in Paris?", tools=tools, tool_choice="auto"
        )
        (call,) = first.output
        assert call.type == "function_call"
        assert (call.name, json.loads(call.arguments), call.call_id) == (
            "get_weather", {"city": "Paris"}, "call_7",
        )  # fmt: skip
        assert _sent(proxy)["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": tools[0]["parameters"]}}]  # fmt: skip
        second = await client.responses.create(
            model=MODEL,
            tools=tools,
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": "call_7",
                    "name": "get_weather",
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": "call_7", "output": "sunny"},
            ],
        )
    assert second.output_text == "It is sunny in Paris."
    assert _sent(proxy)["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_7", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]  # fmt: skip


async def test_a_streamed_function_call_comes_as_argument_deltas(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = []
    proxy.upstream.tool_calls = [{"id": "call_1", "name": "add", "arguments": {"a": 1, "b": 2}}]
    tools: list[Any] = [{"type": "function", "name": "add", "parameters": {"type": "object"}}]
    async with _client(proxy, key) as client:
        stream = await client.responses.create(model=MODEL, input="1+2", tools=tools, stream=True)
        events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    assert json.loads("".join(deltas)) == {"a": 1, "b": 2}
    done = events[-2].item  # type: ignore[union-attr]
    assert (done.type, done.name, done.call_id, done.status) == (
        "function_call", "add", "call_1", "completed",
    )  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_reasoning_becomes_a_reasoning_item_before_the_message(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = ["<think>\nIs it 6", " or 7?\n</thi", "nk>\n\nIt", " is 6."]
    async with _client(proxy, key) as client:
        effort: Any = {"effort": "low"}
        plain = await client.responses.create(model=MODEL, input="2*3?", reasoning=effort)
        stream = await client.responses.create(model=MODEL, input="2*3?", stream=True)
        events = [event async for event in stream]
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    reasoning = plain.output[0]
    assert reasoning.content is not None
    assert reasoning.content[0].text == "Is it 6 or 7?\n"  # type: ignore[union-attr]
    assert plain.output_text == "It is 6."
    streamed = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in streamed.output] == ["reasoning", "message"]
    assert streamed.output_text == "It is 6."
    thought = [e.delta for e in events if e.type == "response.reasoning_text.delta"]  # type: ignore[union-attr]
    assert "".join(thought) == "Is it 6 or 7?\n"


async def test_text_format_json_schema_with_responses_parse(proxy: Harness) -> None:
    class City(BaseModel):
        name: str
        population: int

    key = await proxy.user("alice")
    proxy.upstream.pieces = ['{"name": "Paris", ', '"population": 2100000}']
    async with _client(proxy, key) as client:
        parsed = await client.responses.parse(model=MODEL, input="Paris?", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2100000)
    wanted = _sent(proxy)["response_format"]
    assert wanted["type"] == "json_object"
    population = wanted["schema"]["properties"]["population"]
    assert population == {"title": "Population", "type": "integer"}


async def test_an_answer_cut_by_max_output_tokens_is_incomplete(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.finish_reason = "length"
    async with _client(proxy, key) as client:
        plain = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        stream = await client.responses.create(model=MODEL, input="Hi", stream=True)
        events = [event async for event in stream]
    assert plain.status == "incomplete"
    assert plain.incomplete_details is not None
    assert plain.incomplete_details.reason == "max_output_tokens"
    assert events[-1].type == "response.incomplete"


async def test_input_tokens_counts_what_the_response_then_reports(proxy: Harness) -> None:
    key = await proxy.user("alice")
    proxy.upstream.sized_prompts = True
    tools: list[Any] = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    request: dict[str, Any] = {"model": MODEL, "input": "Hi", "instructions": "Be brief.",
                               "tools": tools}  # fmt: skip
    async with _client(proxy, key) as client:
        counted = await client.responses.input_tokens.count(**request)
        bare = await client.responses.input_tokens.count(model=MODEL, input="Hi")
        answer = await client.responses.create(**request)
    assert counted.input_tokens == answer.usage.input_tokens == prompt_size(_sent(proxy))  # type: ignore[union-attr]
    assert bare.input_tokens < counted.input_tokens
    rows = await proxy.wait_for_records(3)
    assert [(r.path, r.prompt_tokens) for r in rows] == [
        ("/v1/responses/input_tokens", None),
        ("/v1/responses/input_tokens", None),
        ("/v1/responses", counted.input_tokens),
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "input_image_thing"}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
        ({"input": "Hi", "temperature": "hot"}, "temperature"),
        ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
         "text.format.schema"),
    ],
)  # fmt: skip
async def test_what_cannot_be_served_is_a_400_in_openais_shape_naming_the_field(
    proxy: Harness, body: dict[str, Any], param: str
) -> None:
    key = await proxy.user("alice")
    async with _client(proxy, key) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model=MODEL, **body)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert not proxy.upstream.seen  # nothing reached the backend


async def test_stored_responses_continue_across_proxies_and_are_their_makers_alone(
    db_dsn: str, tmp_path: Path
) -> None:
    """`previous_response_id` made at one proxy continues at another (they share only
    Postgres); retrieve, input_items and delete work for the maker; another user's id, a
    deleted one and `store: false` are 404, in OpenAI's shape."""
    async with (
        running_proxy(db_dsn, tmp_path / "one") as one,
        running_proxy(db_dsn, tmp_path / "two") as two,
    ):
        for each in (one, two):
            each.upstream.event_delay = each.upstream.tail_delay = 0.0
        key, other = await one.user("alice"), await one.user("bob")
        one.upstream.pieces = ["Paris."]
        two.upstream.pieces = ["About 2 million."]
        async with _client(one, key) as first, _client(two, key) as second:
            asked = await first.responses.create(
                model=MODEL, instructions="Be brief.", input="Capital of France?"
            )
            assert asked.store is True
            followed = await second.responses.create(
                model=MODEL, input="How many live there?", previous_response_id=asked.id,
                stream=True,
            )  # fmt: skip
            events = [event async for event in followed]
            continued = events[-1].response  # type: ignore[union-attr]
            assert continued.previous_response_id == asked.id
            sent = json.loads(two.upstream.seen[-1].body)["messages"]
            assert sent == [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "How many live there?"},
            ]  # instructions are not carried over, as OpenAI's API does
            third = await first.responses.create(
                model=MODEL, input="And Lyon?", previous_response_id=continued.id
            )
            assert len(json.loads(one.upstream.seen[-1].body)["messages"]) == 5
            fetched = await second.responses.retrieve(asked.id)
            assert fetched.output_text == "Paris."
            assert fetched.usage == asked.usage
            items = await second.responses.input_items.list(third.id, order="asc")
            assert [item.type for item in items.data] == ["message"]
            assert items.data[0].content[0].text == "And Lyon?"  # type: ignore[union-attr]
            unstored = await first.responses.create(model=MODEL, input="Hi", store=False)
            assert unstored.store is False
            await first.responses.delete(third.id)
            for gone in (third.id, unstored.id, "resp_never_made"):
                with pytest.raises(openai.NotFoundError):
                    await second.responses.retrieve(gone)
            with pytest.raises(openai.NotFoundError) as missing:
                await first.responses.create(model=MODEL, input="Hi", previous_response_id=third.id)
            assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
        async with _client(two, other) as stranger:
            for action in (stranger.responses.retrieve, stranger.responses.delete):
                with pytest.raises(openai.NotFoundError):
                    await action(asked.id)
            with pytest.raises(openai.NotFoundError):
                await stranger.responses.create(
                    model=MODEL, input="Hi", previous_response_id=asked.id
                )
        async with _client(one, key) as first:
            assert (await first.responses.retrieve(asked.id)).id == asked.id  # still there
        rows = await one.wait_for_records(len(one.upstream.seen))
        assert {r.path for r in rows} >= {"/v1/responses", "/v1/responses/{id}"}


async def test_with_retention_zero_nothing_is_stored(db_dsn: str, tmp_path: Path) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_RESPONSES_RETENTION="0") as proxy:
        proxy.upstream.event_delay = proxy.upstream.tail_delay = 0.0
        key = await proxy.user("alice")
        async with _client(proxy, key) as client:
            made = await client.responses.create(model=MODEL, input="Hi", store=True)
            assert made.store is False
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(made.id)


@pytest.mark.parametrize("mode", ["close-mid-stream", "end-mid-stream"])
async def test_a_backend_failing_mid_stream_ends_it_with_response_failed(
    proxy: Harness, mode: str
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.mode = mode
    async with _client(proxy, key) as client:
        stream = await client.responses.create(model=MODEL, input="Hi", stream=True)
        events = [event async for event in stream]
        with pytest.raises(openai.APIStatusError) as failed:  # before it began: OpenAI's JSON
            await client.responses.create(model=MODEL, input="Hi")
    assert events[0].type == "response.created"
    assert events[-1].type == "response.failed"
    response = events[-1].response  # type: ignore[union-attr]
    assert response.status == "failed"
    assert response.error is not None
    assert response.error.message.endswith("; try again.")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert failed.value.status_code == 502
    rows = await proxy.wait_for_records(2)
    assert [(r.stream, r.status_code) for r in rows] == [(True, 502), (False, 502)]
    assert all(r.error for r in rows)


async def test_input_tokens_counts_the_conversation_a_previous_response_id_continues(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.sized_prompts = True
    async with _client(proxy, key) as client:
        first = await client.responses.create(model=MODEL, input="My name is Ada.")
        alone = await client.responses.input_tokens.count(model=MODEL, input="And mine?")
        counted = await client.responses.input_tokens.count(
            model=MODEL, input="And mine?", previous_response_id=first.id
        )
        answer = await client.responses.create(
            model=MODEL, input="And mine?", previous_response_id=first.id
        )
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_tokens.count(
                model=MODEL, input="Hi", previous_response_id="resp_never_made"
            )
    assert answer.usage is not None
    assert counted.input_tokens == answer.usage.input_tokens > alone.input_tokens


HOSTILE: list[Any] = [
    {"input": ["just a string"]}, {"input": []}, {"input": [None]}, {"input": 5}, {}, [],
    {"input": [{"type": "message"}]},
    {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
    {"input": [{"role": "user", "content": [{"text": "x"}]}]},
    {"input": [{"type": "function_call", "call_id": 1, "name": "x", "arguments": "{}"}]},
    {"input": "Hi", "tools": [{"type": "function"}]},
    {"input": "Hi", "tools": [{"type": "function", "name": "a b"}]},
    {"input": "Hi", "tool_choice": {"type": "file_search"}},
    {"input": "Hi", "text": {"format": {"type": "json_schema", "schema": "x"}}},
    {"input": "Hi", "metadata": {"a": 1}}, {"input": "Hi", "max_output_tokens": 0},
    {"input": "Hi", "reasoning": "high"}, {"input": "Hi", "store": "yes"},
    {"input": "Hi", "instructions": 7},
    {"input": "Hi", "previous_response_id": "x" * 5000},
    {"input": "Hi", "previous_response_id": "resp_\u0000"},
]  # fmt: skip


async def test_hostile_requests_get_a_4xx_naming_the_field_never_a_500(proxy: Harness) -> None:
    """Odd bodies and ids (a NUL, which Postgres cannot hold; 3000 characters) are refused in
    OpenAI's shape, and reach neither the backend nor, for ids, Postgres."""
    key = await proxy.user("alice")
    async with aiohttp.ClientSession() as http:
        for body in HOSTILE:
            for stream in (False, True):
                sent = body
                if isinstance(body, dict):
                    sent = {**body, "model": MODEL, "stream": stream}
                async with http.post(
                    proxy.url("/v1/responses"), json=sent, headers=bearer(key)
                ) as r:
                    error = (await r.json())["error"]
                    assert r.status in (400, 404), (body, r.status, error)
                    assert error["type"] == "invalid_request_error"
        for path in ("/v1/responses/%00", "/v1/responses/resp_%00x/input_items",
                     "/v1/responses/" + "a" * 3000):  # fmt: skip
            for method in ("GET", "DELETE"):
                async with http.request(method, proxy.url(path), headers=bearer(key)) as r:
                    assert r.status in (404, 405), (method, path, r.status)
    assert not proxy.upstream.seen


async def test_what_the_review_found_stays_fixed(proxy: Harness) -> None:
    """A NUL in the input is stored (as U+FFFD), not a 500 after generation; an empty answer
    is stored too; a conversation whose first response was deleted is not continued half; an
    image in a tool's output is a note, not a refusal of the whole conversation; an answer cut by
    max_output_tokens says its items are incomplete."""
    key = await proxy.user("alice")
    async with _client(proxy, key) as client:
        nul = await client.responses.create(model=MODEL, input="a\u0000b")
        stored = await client.responses.retrieve(nul.id)
        assert stored.id == nul.id
        items = await client.responses.input_items.list(nul.id)
        assert items.data[0].content[0].text == "a\ufffdb"  # type: ignore[union-attr]
        proxy.upstream.pieces = []
        empty = await client.responses.create(model=MODEL, input="Say nothing.")
        assert empty.output == []
        assert (await client.responses.retrieve(empty.id)).id == empty.id
        proxy.upstream.pieces = ["Hello", " world"]
        first = await client.responses.create(model=MODEL, input="One")
        second = await client.responses.create(
            model=MODEL, input="Two", previous_response_id=first.id
        )
        await client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.create(
                model=MODEL, input="Three", previous_response_id=second.id
            )
        assert first.id in gone.value.message
        image = [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]
        await client.responses.create(
            model=MODEL,
            input=[
                {"type": "function_call", "call_id": "c1", "name": "view_image",
                 "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": image},
            ],  # type: ignore[list-item]
        )  # fmt: skip
        assert "reads text only" in _sent(proxy)["messages"][-1]["content"]
        proxy.upstream.finish_reason = "length"
        cut = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert cut.status == "incomplete"
    assert [item.status for item in cut.output] == ["incomplete"]  # type: ignore[union-attr]


async def test_a_continued_conversation_is_charged_whole_against_the_quota(
    proxy: Harness,
) -> None:
    """The new input alone would fit the day's budget; with the conversation it continues it
    does not: a 429, and the model is not asked (it was a way past the quota)."""
    key = await proxy.user("alice")
    await set_limits(proxy.dsn, "alice", tokens_per_day=1000)
    proxy.upstream.sized_prompts = True
    async with _client(proxy, key) as client:
        first = await client.responses.create(model=MODEL, input="x " * 300, max_output_tokens=10)
        assert first.usage is not None
        assert 600 < first.usage.input_tokens < 800
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(
                model=MODEL, input="Hi", previous_response_id=first.id, max_output_tokens=10
            )
        alone = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=10)
    assert alone.status == "completed"
    assert len(proxy.upstream.seen) == 2  # the refused continuation reached no model


async def test_a_stored_response_gives_back_integers_of_any_length_as_sent(
    proxy: Harness,
) -> None:
    """A tool's schema may hold an integer past 64 bits, and a response echoes what it was
    asked: read back from the store exactly (not as a float, nor a 500 past a double's range)."""
    key = await proxy.user("alice")
    huge = 10**400  # past even a double
    tool = {
        "type": "function", "name": "pick", "description": "Pick a number.",
        "parameters": {"type": "object", "properties": {"n": {"maximum": huge}}},
    }  # fmt: skip
    body = json.dumps({"model": MODEL, "input": "Pick one.", "tools": [tool]}).encode()
    headers = {**bearer(key), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url("/v1/responses"), data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            made = json.loads(await r.read())
        async with client.get(proxy.url(f"/v1/responses/{made['id']}"), headers=headers) as r:
            assert r.status == 200, await r.text()
            stored = json.loads(await r.read())
    assert stored["tools"][0]["parameters"]["properties"]["n"]["maximum"] == huge
    assert _sent(proxy)["tools"][0]["function"]["parameters"]["properties"]["n"]["maximum"] == huge
