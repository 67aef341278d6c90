"""Token counts read from answers as they pass, and the usage event only for clients that ask."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from proxy.pipeline.records import RequestRecord
from proxy.upstream.usage import StreamUsage
from tests.fake_upstream import USAGE
from tests.proxy_harness import Harness, bearer, running_proxy

CHUNK = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
PING = b": ping - 2026-11-22 00:00:00\r\n\r\n"
USAGE_EVENT = b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\n'
DONE = b"data: [DONE]\n\n"


def _record() -> RequestRecord:
    return RequestRecord("r", "POST", "/v1/chat/completions", None, datetime.now(UTC))


def _run(reader: StreamUsage, chunks: list[bytes]) -> tuple[bytes, RequestRecord]:
    record = _record()
    out = b"".join(reader.feed(chunk) for chunk in chunks) + reader.finish(record)
    return out, record


def test_usage_event_is_dropped_for_clients_that_did_not_ask() -> None:
    out, record = _run(StreamUsage(drop=True), [CHUNK, PING, CHUNK, USAGE_EVENT, DONE])
    assert out == CHUNK + PING + CHUNK + DONE
    assert (record.prompt_tokens, record.completion_tokens) == (9, 4)


def test_usage_event_is_kept_for_clients_that_asked() -> None:
    stream = [CHUNK, USAGE_EVENT, DONE]
    out, record = _run(StreamUsage(drop=False), stream)
    assert out == b"".join(stream)
    assert (record.prompt_tokens, record.completion_tokens) == (9, 4)


def test_events_split_across_chunks_are_reassembled_byte_exact() -> None:
    whole = CHUNK + PING + CHUNK + USAGE_EVENT + DONE
    for size in (1, 3, 7, 64):
        pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
        out, record = _run(StreamUsage(drop=True), pieces)
        assert out == CHUNK + PING + CHUNK + DONE, size
        assert record.prompt_tokens == 9


def test_complete_events_pass_at_once_and_only_a_partial_one_waits() -> None:
    reader = StreamUsage(drop=True)
    assert reader.feed(CHUNK) == CHUNK
    assert reader.feed(CHUNK[:10]) == b""
    assert reader.feed(CHUNK[10:] + PING[:5]) == CHUNK
    assert reader.feed(PING[5:]) == PING


def test_chunks_with_usage_null_and_text_mentioning_usage_are_not_taken_for_it() -> None:
    null_usage = b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
    talk = b'data: {"choices": [{"delta": {"content": "the \\"usage\\" key"}}]}\n\n'
    out, record = _run(StreamUsage(drop=True), [null_usage, talk, DONE])
    assert out == null_usage + talk + DONE
    assert record.prompt_tokens is None


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
    async with aiohttp.ClientSession() as client:
        async with client.post(
            proxy.url("/v1/chat/completions"), json=chat, headers=bearer(key)
        ) as r:
            plain = await _events(r)
        async with client.post(
            proxy.url("/v1/chat/completions"), json=asked, headers=bearer(key)
        ) as r:
            with_usage = await _events(r)
    # The backend was asked for usage both times; only the client that asked received it.
    sent = [json.loads(seen.body) for seen in proxy.upstream.seen]
    assert all(body["stream_options"] == {"include_usage": True} for body in sent)
    assert plain[-1] == "[DONE]"
    assert not any('"usage"' in event for event in plain)
    assert json.loads(with_usage[-2])["usage"] == USAGE
    assert with_usage[:-2] == plain[:-1]
    first, second = await proxy.wait_for_records(2)
    for record in (first, second):
        assert (record.prompt_tokens, record.completion_tokens) == (5, 2)
    assert second.bytes_out > first.bytes_out


async def test_plain_answers_are_counted(proxy: Harness) -> None:
    key = await proxy.user("bob")
    async with aiohttp.ClientSession() as client:
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        async with client.post(
            proxy.url("/v1/chat/completions"), json=chat, headers=bearer(key)
        ) as r:
            assert r.status == 200
        async with client.post(
            proxy.url("/v1/embeddings"), json={"input": "x"}, headers=bearer(key)
        ) as r:
            assert r.status == 200
        async with client.get(proxy.url("/v1/models"), headers=bearer(key)) as r:
            assert r.status == 200
    chat_record, embedding, models = await proxy.wait_for_records(3)
    assert (chat_record.prompt_tokens, chat_record.completion_tokens) == (5, 2)
    assert (embedding.prompt_tokens, embedding.completion_tokens) == (3, 0)
    assert (models.prompt_tokens, models.completion_tokens) == (None, None)
