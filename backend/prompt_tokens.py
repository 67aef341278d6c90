"""How many tokens a chat request's prompt is, exactly as a completion would count it, without
processing it: the request is rendered with the model's chat template and tokenized by the very
code a completion runs, which is stopped at its first prompt-cache lookup (the moment the prompt
tokens exist and nothing has been evaluated yet).

llama-gate's proxy uses it for Anthropic's `count_tokens`, which must equal the `input_tokens`
the same request then reports: both are the length of that lookup's key.
"""

from __future__ import annotations

import contextlib
from typing import Any

from llama_cpp import Llama
from llama_cpp.server.app import get_llama_proxy, prepare_request_resources
from llama_cpp.server.types import CreateChatCompletionRequest
from starlette.concurrency import run_in_threadpool

from backend.usage import TokenTap

PATH = "/llama-gate/prompt-tokens"
_EXCLUDE = frozenset({"n", "logit_bias_type", "user", "min_tokens", "stream", "stream_options"})


class _Counted(Exception):
    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


def _stop(tokens: int) -> None:
    raise _Counted(tokens)


def count(llama: Llama, kwargs: dict[str, Any]) -> int:
    """On the model's worker thread, under its lock: the prompt tokens of a chat completion."""
    real = llama.cache
    # The tap completions report their prompt tokens through, stopping at its first lookup.
    llama.set_cache(TokenTap(None, on_prompt=_stop))
    try:
        llama.create_chat_completion(**kwargs, stream=False)
    except _Counted as counted:
        return counted.tokens
    finally:
        with contextlib.suppress(Exception):
            llama.set_cache(real)
    raise RuntimeError("the completion finished without looking its prompt up")


async def prompt_tokens(body: CreateChatCompletionRequest) -> int:
    """Count under llama_cpp.server's own model lock, as its handlers run."""
    kwargs = body.model_dump(exclude=set(_EXCLUDE))
    async with contextlib.asynccontextmanager(get_llama_proxy)() as llama_proxy:
        llama = prepare_request_resources(body, llama_proxy, body.model, kwargs)
        return await run_in_threadpool(count, llama, kwargs)
