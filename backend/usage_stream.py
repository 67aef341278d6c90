"""A streamed chat or text completion served as llama_cpp.server's own handler serves it, through
its own event publisher (model lock, disconnects, `[DONE]`), but with a `Llama` call that ends in
the usage chunk (`backend.usage`) and, when llama-gate's proxy asks, announces the prompt's
length before it is read; and the `Meter` of tokens the model evaluated, for `/health`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from llama_cpp import Llama
from llama_cpp.server.app import get_event_publisher
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from backend.cache_plan import ModelCache
from backend.usage import Chunk, with_usage

PROGRESS_OPTION = "llama_gate_progress"  # see backend.usage


@dataclass(frozen=True)
class UsageStream:
    """How llama_cpp.server 0.3.36 turns one kind of request into a streaming `Llama` call."""

    request_model: type[BaseModel]
    call: Callable[..., Iterator[Chunk]]
    exclude: frozenset[str]  # the fields its handler drops before calling Llama, copied from it
    object_name: str


USAGE_STREAMS = {
    "/v1/chat/completions": UsageStream(
        CreateChatCompletionRequest,
        with_usage(Llama.create_chat_completion, "chat.completion.chunk"),
        frozenset({"n", "logit_bias_type", "user", "min_tokens"}),
        "chat.completion.chunk",
    ),
    "/v1/completions": UsageStream(
        CreateCompletionRequest,
        with_usage(Llama.__call__, "text_completion"),
        frozenset({"n", "best_of", "logit_bias_type", "user", "min_tokens"}),
        "text_completion",
    ),
}


class Meter:
    """Tokens the model evaluated (prompt tokens read, not cached, and tokens generated), for
    `/health`: what a token quota bounds, measured where the work is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.evaluated = 0

    def add(self, tokens: int) -> None:
        with self._lock:
            self.evaluated += max(0, tokens)


def wants_usage(data: dict[str, Any]) -> bool:
    options = data.get("stream_options")
    return (
        data.get("stream") is True
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def _wants_progress(data: dict[str, Any]) -> bool:
    """llama-gate's proxy asks for the prompt's usage as soon as it is known (see usage.py)."""
    options = data.get("stream_options")
    return isinstance(options, dict) and options.get(PROGRESS_OPTION) is True


async def stream_with_usage(
    stream: UsageStream,
    data: dict[str, Any],
    scope: Scope,
    receive: Receive,
    send: Send,
    model_cache: ModelCache,
    meter: Meter,
) -> bool:
    """Serve a streamed request as llama_cpp.server's own handler would, through its own
    publisher (model lock, disconnects, [DONE]), with a `Llama` call that ends in usage.

    Returns False, having sent nothing, for a body llama_cpp.server should answer itself.
    """
    try:
        body: Any = stream.request_model.model_validate(data)
    except ValidationError:
        return False  # its 422, in its words
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, list) and not all(isinstance(token, int) for token in prompt):
        if len(prompt) > 1:
            return False  # it refuses batches; let it
        body.prompt = prompt[0]  # a batch of one (measured, so never empty)
    kwargs = body.model_dump(exclude=stream.exclude)
    send_chan, recv_chan = anyio.create_memory_object_stream[dict[str, str]](10)

    # Called on the worker thread that runs the model, before the prompt is processed.
    def announce(tokens: int) -> None:
        event = _progress_event(stream.object_name, body.model, tokens)
        anyio.from_thread.run(send_chan.send, {"data": json.dumps(event)})

    on_prompt = announce if _wants_progress(data) else None

    def llama_call(llama: Llama, **kwargs: Any) -> Iterator[Chunk]:
        # On the model's worker thread, under its lock: the model this request reached.
        model_cache.install(llama)
        return stream.call(llama, on_prompt=on_prompt, on_evaluated=meter.add, **kwargs)

    publisher = partial(
        get_event_publisher,
        request=Request(scope, receive),
        inner_send_chan=send_chan,
        body=body,
        body_model=body.model,
        llama_call=llama_call,
        kwargs=kwargs,
    )
    response = EventSourceResponse(recv_chan, data_sender_callable=publisher, sep="\n")
    await response(scope, receive, send)
    return True


def _progress_event(object_name: str, model: str | None, prompt_tokens: int) -> Chunk:
    """A usage-only event, as the last one of a stream is, for the prompt alone."""
    return {
        "id": "progress",
        "object": object_name,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 0,
            "total_tokens": prompt_tokens,
        },
    }
