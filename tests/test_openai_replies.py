"""OpenAI answers: streams relayed with usage only for clients that asked, one JSON answer
assembled from a stream for clients that did not, and tokens counted either way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.dialects.openai_answer import Answer
from proxy.upstream.events import usage_in_tail
from tests.fake_upstream import USAGE
from tests.proxy_harness import Harness, bearer, running_proxy


def test_usage_is_read_from_the_last_bytes_of_a_json_answer() -> None:
    body = json.dumps({"data": ["x" * 10_000], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
    assert usage_in_tail(body[-4096:].encode()) == {"prompt_tokens": 3, "total_tokens": 3}
    assert usage_in_tail(b'{"data": [1, 2, 3]}') is None
    assert usage_in_tail(b'"usage": {"prompt_tok') is None  # cut off: no figures, no error


def _chunk(**choice: Any) -> dict[str, Any]:
    return {"id": "c1", "created": 7, "model": "m", "choices": [{"index": 0, **choice}]}


def test_a_chat_answer_with_tool_calls_is_assembled_as_an_unstreamed_one_reads() -> None:
    answer = Answer("chat")
    answer.add(_chunk(delta={"role": "assistant"}))
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get"}}
    answer.add(_chunk(delta={"tool_calls": [{**call, "function": {**call["function"]}}]}))
    answer.add(_chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    answer.add(_chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}))
    answer.add(_chunk(delta={}, finish_reason="tool_calls"))
    answer.usage = USAGE
    document = answer.document()
    assert document["object"] == "chat.completion"
    assert (document["id"], document["created"], document["model"]) == ("c1", 7, "m")
    (choice,) = document["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get", "arguments": '{"a": 1}'},
            }
        ],
    }
    assert document["usage"] == USAGE


def test_a_text_answer_with_logprobs_is_assembled() -> None:
    answer = Answer("text")
    for text, offset in (("He", 0), ("llo", 2)):
        logprobs = {"text_offset": [offset], "token_logprobs": [-0.5], "tokens": [text],
                    "top_logprobs": [{text: -0.5}]}  # fmt: skip
        answer.add(_chunk(text=text, logprobs=logprobs, finish_reason=None))
    answer.add(_chunk(text="", logprobs=None, finish_reason="length"))
    (choice,) = answer.document()["choices"]
    assert choice["text"] == "Hello"
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["He", "llo"]
    assert choice["logprobs"]["text_offset"] == [0, 2]


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


async def _events(response: aiohttp.ClientResponse) -> list[str]:
    text = (await response.read()).decode()
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def test_streams_are_counted_and_answer_exactly_what_was_asked(proxy: Harness) -> None:
    key = await proxy.user("alice")
    chat = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    asked = {**chat, "stream_options": {"include_usage": True}}
    url = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:
        async with client.post(url, json=chat, headers=bearer(key)) as r:
            plain = await _events(r)
        async with client.post(url, json=asked, headers=bearer(key)) as r:
            with_usage = await _events(r)
    # The backend was asked for usage both times; only the client that asked received it,
    # once, last before [DONE], as OpenAI sends it.
    sent = [json.loads(seen.body) for seen in proxy.upstream.seen]
    assert all(body["stream_options"]["include_usage"] is True for body in sent)
    assert plain[-1] == "[DONE]"
    assert not any('"usage"' in event for event in plain)
    assert [json.loads(e).get("usage") for e in with_usage[:-1]].count(None) == len(plain) - 1
    assert json.loads(with_usage[-2])["usage"] == USAGE
    assert with_usage[:-2] == plain[:-1]
    first, second = await proxy.wait_for_records(2)
    for record in (first, second):
        assert (record.prompt_tokens, record.completion_tokens) == (5, 2)
    assert second.response_bytes > first.response_bytes


async def test_an_unstreamed_answer_is_assembled_from_the_backends_stream(proxy: Harness) -> None:
    key = await proxy.user("bob")
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/v1"), api_key=key, max_retries=0, timeout=10
    ) as client:
        chat = await client.chat.completions.create(
            model="smollm2-test", messages=[{"role": "user", "content": "Hi"}]
        )
        text = await client.completions.create(model="smollm2-test", prompt="Hi")
        embedding = await client.embeddings.create(model="smollm2-test", input="x")
    assert chat.choices[0].message.content == "Hello world"
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (5, 2)
    assert text.choices[0].text == "Hello world"
    assert text.object == "text_completion"
    assert all(json.loads(seen.body).get("stream") for seen in proxy.upstream.seen[:2])
    chat_row, text_row, embedding_row, *_ = await proxy.wait_for_records(3)
    assert (chat_row.prompt_tokens, chat_row.completion_tokens, chat_row.stream) == (5, 2, False)
    assert (text_row.prompt_tokens, text_row.completion_tokens) == (5, 2)
    assert (embedding_row.prompt_tokens, embedding_row.completion_tokens) == (3, 0)
    assert chat_row.ttfb_ms is not None
    assert chat_row.ttfb_ms < chat_row.duration_ms
    assert len(embedding.data) == 1
