"""The prompt cache with the real backend and model: conversations stay warm while others talk,
the budget bounds the cache, `off` works, and logprobs are refused while the cache is on."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.backend_harness import DEFAULT, Backend, running_backend

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant who answers in one short sentence."
TOPICS = {
    "ann": "the history of lighthouses on rocky coasts and how their keepers lived",
    "bob": "how sourdough bread rises and why the starter needs feeding every day",
    "cid": "the rules of chess for castling and why the king may not pass through check",
}


def _health(backend: Backend) -> dict[str, Any]:
    with urllib.request.urlopen(f"{backend.url}/health", timeout=5) as response:  # noqa: S310
        body: dict[str, Any] = json.load(response)
        return body


@pytest.fixture
def client_for() -> Iterator[Any]:
    clients: list[openai.OpenAI] = []

    def make(backend: Backend) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{backend.url}/v1", api_key=backend.key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _turn(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[str, Any]:
    """One streamed turn, as llama-gate's proxy asks for it: its text and its final usage."""
    stream = client.chat.completions.create(
        model=DEFAULT,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return text, usage


def _interleave(client: openai.OpenAI, turns: int) -> dict[str, list[Any]]:
    """Three conversations, one turn each in turn; each one's usages."""
    chats = {name: [{"role": "system", "content": SYSTEM}] for name in TOPICS}
    usages: dict[str, list[Any]] = {name: [] for name in TOPICS}
    for turn in range(turns):
        for name, topic in TOPICS.items():
            ask = f"Tell me something new about {topic} (question {turn + 1})."
            chats[name].append({"role": "user", "content": ask})
            text, usage = _turn(client, chats[name])
            chats[name].append({"role": "assistant", "content": text})
            usages[name].append(usage)
    return usages


def _cached(usage: Any) -> int:
    assert usage.prompt_tokens_details is not None
    return int(usage.prompt_tokens_details.cached_tokens)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_each_users_second_turn_is_served_from_cache_while_three_interleave(
    tmp_path: Path, client_for: Any, mode: str
) -> None:
    with running_backend(tmp_path, LLAMA_PROMPT_CACHE=mode) as backend:
        usages = _interleave(client_for(backend), turns=2)
        health = _health(backend)
        states = sorted((tmp_path / "runtime" / "cache" / "prompt-states").glob("*.state"))
    for name, (first, second) in usages.items():
        # The whole first turn (prompt and answer but its last token) is not read again,
        # although two other conversations ran on the model in between.
        assert _cached(second) >= first.prompt_tokens + first.completion_tokens - 2, name
        assert _cached(second) < second.prompt_tokens
    cache = health["prompt_cache"]
    assert cache["mode"] == mode
    assert cache["states"] == 3  # one per conversation: each first turn's state was replaced
    assert len(states) == (3 if mode == "disk" else 0)  # a file each, kept after being read
    assert 0 < cache["bytes"] <= cache["capacity_bytes"]
    assert cache["hits"] >= 3


def test_the_budget_bounds_the_cache(tmp_path: Path, client_for: Any) -> None:
    # One conversation's state here is about 2 MiB (SmolLM2: ~23 KiB of context per token).
    with running_backend(tmp_path, LLAMA_PROMPT_CACHE_BYTES="3M") as backend:
        usages = _interleave(client_for(backend), turns=2)
        cache = _health(backend)["prompt_cache"]
    assert cache["capacity_bytes"] == 3 << 20
    assert 0 < cache["bytes"] <= 3 << 20
    assert cache["states"] == 1
    assert cache["evictions"] >= 3
    # Only the conversation that ran last kept its state; the others read their turns again.
    seconds = [_cached(turns[1]) for turns in usages.values()]
    firsts = [turns[0].prompt_tokens for turns in usages.values()]
    assert sum(cached >= first for cached, first in zip(seconds, firsts, strict=True)) <= 1


def test_off_keeps_no_cache_and_still_serves_logprobs(tmp_path: Path, client_for: Any) -> None:
    with running_backend(tmp_path, LLAMA_PROMPT_CACHE="off") as backend:
        client = client_for(backend)
        usages = _interleave(client, turns=2)
        health = _health(backend)
        answer = client.chat.completions.create(
            model=DEFAULT,
            messages=[{"role": "user", "content": "Say yes."}],
            max_tokens=2,
            logprobs=True,
            top_logprobs=1,  # llama_cpp.server gives none without it
        )
    assert health["prompt_cache"] == {"mode": "off"}
    for first, second in usages.values():
        # Only the system prompt is still in the model's one context when a turn comes back.
        assert _cached(second) < first.prompt_tokens
    assert answer.choices[0].logprobs is not None


def test_with_the_cache_on_logprobs_are_refused_in_one_clear_answer(
    tmp_path: Path, client_for: Any
) -> None:
    with running_backend(tmp_path) as backend:
        client = client_for(backend)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=DEFAULT,
                messages=[{"role": "user", "content": "Say yes."}],
                max_tokens=2,
                logprobs=True,
            )
        # Unstreamed, so llama_cpp.server's own handler serves it: the model had the cache
        # from the start, and the refused request never reached it.
        text = client.completions.create(model=DEFAULT, prompt="Yes", max_tokens=2)
        cache = _health(backend)["prompt_cache"]
    assert (cache["misses"], cache["states"]) == (1, 1)
    assert refused.value.status_code == 400
    assert "LLAMA_PROMPT_CACHE=off" in str(refused.value)
    assert text.choices[0].text is not None  # without logprobs all is well
