"""The usage chunk OpenAI sends last on a stream when asked (`stream_options.include_usage`).

llama_cpp.server 0.3.36 never counts tokens on a stream, and counting from outside is wrong: a chunk
may carry several tokens, the end-of-generation token is never shown, a stop sequence is cut out of
the text, and `Llama.n_tokens` is one short or not depending on why generation ended. The exact
counts are those an unstreamed request reports: `len(prompt_tokens)` and `len(completion_tokens)`
inside `Llama._create_completion`. On a stream, the one place those lists leave that function is the
prompt cache: it looks up `prompt_tokens` before generating and stores `prompt_tokens +
completion_tokens` after. So while a stream runs (under the server's model lock) the model's cache
is a `TokenTap`, installed with the public `Llama.set_cache`, that notes both lengths and passes
every call on to the cache that was there, or answers as an empty cache when there was none.

Cost: before a store Llama runs `save_state()`, a copy of this request's KV cache and logits. With
LLAMA_PROMPT_CACHE on that happens anyway; without it, it is the price of exact counts, paid only by
streams that ask for usage.

The tap's first lookup is also where the prompt's cached tokens are counted (OpenAI's
`usage.prompt_tokens_details.cached_tokens`): the tokens Llama will not read again because the
context it holds, or the state the cache returns, already starts with them. Llama keeps the longer
of the two and always reads the prompt's last token again, for fresh logits to sample from.

That lookup is also the first moment the prompt's length is known: before it is
processed. `on_prompt` is told it then, so llama-gate's proxy (which asks with
`stream_options.llama_gate_progress`) hears it at once and can charge a client who leaves during
a long prompt for the prompt it made the model read.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, cast

import numpy as np
from llama_cpp import Llama
from llama_cpp.llama import LlamaState
from llama_cpp.llama_cache import BaseLlamaCache

Chunk = dict[str, Any]


class TokenTap(BaseLlamaCache):
    """A prompt cache that records the length of every key Llama looks up and stores."""

    def __init__(
        self,
        inner: BaseLlamaCache | None,
        on_prompt: Callable[[int], None] | None = None,
        llama: Llama | None = None,
    ) -> None:
        super().__init__(inner.capacity_bytes if inner is not None else 0)
        self.inner = inner
        self.on_prompt = on_prompt
        self.llama = llama  # whose context counts as cached too
        self.lookups: list[int] = []
        self.stores: list[int] = []
        self.last_key: Sequence[int] = ()  # the prompt and completion of the last completion
        self.cached = 0  # of the first prompt's tokens

    @property
    def cache_size(self) -> int:
        return self.inner.cache_size if self.inner is not None else 0

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        self.lookups.append(len(key))
        first = len(self.lookups) == 1
        if first and self.on_prompt is not None:
            self.on_prompt(len(key))
        live = 0
        if first and self.llama is not None:
            live = shared_prefix(self.llama.input_ids[: self.llama.n_tokens], key)
        try:
            if self.inner is None:
                raise KeyError("empty cache")  # what Llama takes for a miss
            state = self.inner[key]
        except KeyError:
            if first:
                self.cached = _reused(live, len(key))
            raise
        if first:
            stored = shared_prefix(state.input_ids[: state.n_tokens], key)
            self.cached = _reused(max(live, stored), len(key))
        return state

    def __contains__(self, key: Sequence[int]) -> bool:
        return self.inner is not None and key in self.inner

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        self.stores.append(len(key))
        self.last_key = key
        if self.inner is not None:
            self.inner[key] = value

    def usage(self) -> dict[str, Any] | None:
        """OpenAI's usage object, or None when no completion finished."""
        if not self.stores or len(self.lookups) != len(self.stores):
            return None
        # One lookup and one store per completion; the multi-step function-calling handlers
        # run several, and what they generate in all is the completion.
        prompt = self.lookups[0]
        completion = sum(
            store - lookup for lookup, store in zip(self.lookups, self.stores, strict=True)
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


def _stop_sequence(llama: Llama, tap: TokenTap, stop: Any, last: Chunk) -> str | None:
    """Which of the request's stop sequences ended the completion, if one did.

    llama_cpp cuts a stop sequence out of the text and says only `finish_reason: "stop"`, as it
    does at the end-of-text token; Anthropic's API names the sequence that matched. The tokens
    generated still hold it: the first of the sequences to appear in them is the one.
    """
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    choices = last.get("choices") or [{}]
    if not stops or choices[0].get("finish_reason") != "stop" or not tap.lookups:
        return None
    generated = llama.detokenize(list(tap.last_key[tap.lookups[-1] :])).decode("utf-8", "ignore")
    found = [(generated.find(s), s) for s in stops if isinstance(s, str) and s and s in generated]
    return min(found)[1] if found else None


def shared_prefix(tokens: Any, key: Sequence[int]) -> int:
    """How many leading tokens the array `tokens` and `key` have in common."""
    n = min(len(tokens), len(key))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(tokens[:n]) != np.asarray(key[:n], dtype=np.intc))
    return int(differ[0]) if len(differ) else n


def _reused(prefix: int, prompt: int) -> int:
    # With the whole prompt at hand Llama still reads its last token again (see the docstring).
    return min(prefix, prompt - 1) if prompt else 0


def _real_cache(llama: Llama) -> BaseLlamaCache | None:
    cache = llama.cache
    # A stream dropped mid-way restores its cache only when its generator is collected; never
    # wrap its tap, or restoring in the wrong order could leave a tap in place for good.
    while isinstance(cache, TokenTap):
        cache = cache.inner
    return cache


def with_usage(
    method: Callable[..., Any], object_name: str
) -> Callable[..., Generator[Chunk, None, None]]:
    """Wrap a streaming `Llama` method (called as `method(llama, **kwargs)`) so that its stream
    ends with OpenAI's usage chunk: `"choices": []` and the counts an unstreamed call reports."""

    def stream(
        llama: Llama,
        *,
        on_prompt: Callable[[int], None] | None = None,
        on_evaluated: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> Generator[Chunk, None, None]:
        tap = TokenTap(_real_cache(llama), on_prompt, llama)
        llama.set_cache(tap)
        last: Chunk | None = None
        try:
            # The chunks are left exactly as an unasked-for stream has them (OpenAI would add
            # "usage": null to each), so the proxy, which asks for usage on every stream to count
            # tokens, gives a client that did not ask precisely the stream it asked for by
            # dropping the last event alone.
            for chunk in cast(Iterator[Chunk], method(llama, **kwargs)):
                last = chunk
                yield chunk
        finally:
            if llama.cache is tap:
                llama.set_cache(tap.inner)
            if on_evaluated is not None and tap.lookups:
                # What the context holds now, less what it held of this prompt before: the
                # tokens read and generated, whether the stream ended or was left.
                on_evaluated(llama.n_tokens - tap.cached)
        usage = tap.usage()
        if last is not None and usage is not None:
            final: Chunk = {
                "id": last["id"],
                "object": object_name,
                "created": last["created"],
                "model": last["model"],
                "choices": [],
                "usage": usage,
            }
            matched = _stop_sequence(llama, tap, kwargs.get("stop"), last)
            if matched is not None:
                final["llama_gate"] = {"stop_sequence": matched}
            yield final

    return stream
