"""`backend.usage` against a real `Llama` in this process: exact counts, and the model's own
prompt cache back in place however a stream ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama
from llama_cpp.llama_cache import LlamaRAMCache

from backend.prompt_cache import PromptCache
from backend.usage import TokenTap, with_usage

pytestmark = pytest.mark.slow

GGUF = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Reply with just the word yes."}],
    "max_tokens": 48,
    "temperature": 0,
    "seed": 3,
}
chat_with_usage = with_usage(Llama.create_chat_completion, "chat.completion.chunk")


def _counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


@pytest.fixture(scope="module")
def llama() -> Iterator[Llama]:
    model = Llama(str(GGUF), n_ctx=512, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture(autouse=True)
def no_cache(llama: Llama) -> Iterator[None]:
    llama.set_cache(None)
    yield
    llama.set_cache(None)


def test_usage_chunk_counts_what_the_unstreamed_call_counts(llama: Llama) -> None:
    whole: Any = llama.create_chat_completion(**CHAT)
    assert whole["choices"][0]["finish_reason"] == "stop"  # ends on the end-of-text token
    *body, last = chat_with_usage(llama, **CHAT, stream=True)
    assert _counts(last["usage"]) == _counts(whole["usage"])
    # The same prompt again: the model's context still holds all of it but the last token.
    assert last["usage"]["prompt_tokens_details"] == {
        "cached_tokens": whole["usage"]["prompt_tokens"] - 1
    }
    assert last["choices"] == []
    assert last["object"] == "chat.completion.chunk"
    assert last["id"] == body[0]["id"]
    assert llama.cache is None


def test_a_real_prompt_cache_still_serves_and_is_put_back(llama: Llama) -> None:
    whole: Any = llama.create_chat_completion(**CHAT)
    cache = LlamaRAMCache(capacity_bytes=2 << 28)
    llama.set_cache(cache)
    for _ in range(2):  # a miss that stores through the tap, then a hit
        *_, last = chat_with_usage(llama, **CHAT, stream=True)
        assert _counts(last["usage"]) == _counts(whole["usage"])
        assert llama.cache is cache
        assert len(cache.cache_state) == 1


def test_a_dropped_stream_puts_the_cache_back(llama: Llama) -> None:
    stream = chat_with_usage(llama, **CHAT, stream=True)
    next(stream)
    assert isinstance(llama.cache, TokenTap)
    stream.close()  # what collecting it does when a client leaves mid-stream
    assert llama.cache is None


def test_a_stream_started_while_a_dropped_one_lingers_ends_with_the_real_cache(
    llama: Llama,
) -> None:
    cache = LlamaRAMCache(capacity_bytes=2 << 28)
    llama.set_cache(cache)
    dropped = chat_with_usage(llama, **CHAT, stream=True)
    next(dropped)  # its tap is still in place, its generator not yet collected
    *_, last = chat_with_usage(llama, **CHAT, stream=True)
    assert last["usage"]["completion_tokens"] > 0
    assert llama.cache is cache  # not the lingering tap
    dropped.close()
    assert llama.cache is cache


def test_cached_tokens_count_what_the_cache_and_the_context_spare(llama: Llama) -> None:
    cache = PromptCache(64 << 20)
    llama.set_cache(cache)
    ann = [{"role": "user", "content": "Name a colour of the rainbow."}]
    bob = [{"role": "user", "content": "Which planet is the largest?"}]

    def turn(messages: list[dict[str, str]]) -> dict[str, Any]:
        *chunks, last = chat_with_usage(llama, messages=messages, max_tokens=8, stream=True)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        messages.append({"role": "assistant", "content": text})
        usage: dict[str, Any] = last["usage"]
        return usage

    first_ann, first_bob = turn(ann), turn(bob)
    # Nothing in common with anything before but the chat template's default system prompt.
    for first in (first_ann, first_bob):
        assert first["prompt_tokens_details"]["cached_tokens"] < first["prompt_tokens"] - 5
    ann.append({"role": "user", "content": "And another one?"})
    second_ann = turn(ann)  # bob ran in between: ann's state comes back from the cache
    cached = second_ann["prompt_tokens_details"]["cached_tokens"]
    assert first_ann["prompt_tokens"] + first_ann["completion_tokens"] - 2 <= cached
    assert cached < second_ann["prompt_tokens"]
    assert cache.stats().states == 2  # ann's first state gave way to its second
