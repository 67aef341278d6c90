"""`backend.usage` against a real `Llama` in this process: exact counts, and the model's own
prompt cache back in place however a stream ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama
from llama_cpp.llama_cache import LlamaRAMCache

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
    assert last["usage"] == whole["usage"]
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
        assert last["usage"] == whole["usage"]
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
