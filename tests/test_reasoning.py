"""<think> tags taken out of text split anywhere: nothing of a tag leaks, nothing waits longer
than a possible tag start."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dialects.reasoning import ThinkSplitter, split_text
from tests.proxy_harness import Harness, bearer, running_proxy

TEXT = "<think>\nWeigh it: 2 < 3, so </th is no tag.\n</think>\n\nThe answer is 42 <b>ok</b>."
REASONING = "Weigh it: 2 < 3, so </th is no tag.\n"
ANSWER = "The answer is 42 <b>ok</b>."


def _run(chunks: list[str]) -> tuple[str, str, list[str]]:
    splitter = ThinkSplitter()
    reasoning, answer, sent = "", "", []
    for chunk in chunks:
        for is_reasoning, text in splitter.feed(chunk):
            sent.append(text)
            if is_reasoning:
                reasoning += text
            else:
                answer += text
    for is_reasoning, text in splitter.flush():
        sent.append(text)
        reasoning, answer = (
            (reasoning + text, answer) if is_reasoning else (reasoning, answer + text)
        )
    return reasoning, answer, sent


@pytest.mark.parametrize("cut", range(1, len(TEXT)))
def test_a_split_at_any_position_gives_the_same_reasoning_and_answer(cut: int) -> None:
    reasoning, answer, sent = _run([TEXT[:cut], TEXT[cut:]])
    assert (reasoning, answer) == (REASONING, ANSWER)
    assert not any(piece in text for text in sent for piece in ("<think", "</think", "think>"))


def test_one_character_at_a_time_holds_back_only_a_possible_tag_start() -> None:
    splitter = ThinkSplitter()
    for char in "<thin":
        assert splitter.feed(char) == []  # could still become <think>
    assert splitter.feed("g") == [(False, "<thing")]  # it did not: out at once
    assert splitter.feed("s <") == [(False, "s ")]
    assert splitter.feed("3") == [(False, "<3")]
    reasoning, answer, _ = _run(list(TEXT))
    assert (reasoning, answer) == (REASONING, ANSWER)


def test_text_without_tags_passes_unchanged_and_unheld() -> None:
    assert _run(["Hello", " world"]) == ("", "Hello world", ["Hello", " world"])
    assert split_text("no tags <here>") == ("", "no tags <here>")


def test_an_unclosed_reasoning_is_reasoning_to_the_end() -> None:
    assert split_text("<think>still thinking when the tokens ran out") == (
        "still thinking when the tokens ran out",
        "",
    )


# -- through the proxy's OpenAI route ---------------------------------------------------------


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        harness.upstream.event_delay = harness.upstream.tail_delay = 0.0
        yield harness


CHAT = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Think first."}]}


async def _stream(client: aiohttp.ClientSession, url: str, key: str) -> tuple[bytes, list[Any]]:
    async with client.post(url, json={**CHAT, "stream": True}, headers=bearer(key)) as r:
        raw = await r.read()
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]
    return raw, [e["choices"][0]["delta"] for e in events if e["choices"]]


async def test_streamed_reasoning_is_split_out_wherever_the_chunks_break(proxy: Harness) -> None:
    key = await proxy.user("alice", rate_limit=1000)
    url = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as client:
        for cut in range(1, len(TEXT)):
            proxy.upstream.pieces = [TEXT[:cut], TEXT[cut:]]
            raw, deltas = await _stream(client, url, key)
            assert b"think>" not in raw, cut
            assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING, cut
            assert "".join(d.get("content") or "" for d in deltas) == ANSWER, cut


async def test_reasoning_in_whole_answers_the_think_route_and_the_strip_setting(
    proxy: Harness, db_dsn: str, tmp_path: Path
) -> None:
    key = await proxy.user("alice")
    proxy.upstream.pieces = [TEXT[:9], TEXT[9:40], TEXT[40:]]
    async with aiohttp.ClientSession() as client:
        async with client.post(
            proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
        ) as r:
            message = (await r.json())["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (REASONING, ANSWER)
        async with client.post(
            proxy.url("/v1/chat/completions/think"), json=CHAT, headers=bearer(key)
        ) as r:
            kept = (await r.json())["choices"][0]["message"]
        assert kept["content"] == TEXT  # exactly as generated
        assert "reasoning_content" not in kept
        _, deltas = await _stream(client, proxy.url("/v1/chat/completions/think"), key)
        assert "".join(d.get("content") or "" for d in deltas) == TEXT
    rows = await proxy.wait_for_records(3)
    assert {row.path for row in rows} == {"/v1/chat/completions", "/v1/chat/completions/think"}
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_REASONING="strip") as stripping:
        stripping.upstream.pieces = [TEXT]
        async with aiohttp.ClientSession() as client:
            raw, deltas = await _stream(client, stripping.url("/v1/chat/completions"), key)
        assert b"Weigh it" not in raw
        assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    async with running_proxy(db_dsn, tmp_path / "keep", LLAMA_PROXY_REASONING="keep") as keeping:
        keeping.upstream.pieces = [TEXT[:9], TEXT[9:]]
        async with (
            aiohttp.ClientSession() as client,
            client.post(keeping.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)) as r,
        ):
            message = (await r.json())["choices"][0]["message"]
        assert message["content"] == TEXT  # as /think answers by default
        assert "reasoning_content" not in message
