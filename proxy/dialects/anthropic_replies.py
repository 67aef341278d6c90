"""Anthropic Messages answers, made from the OpenAI stream the backend sends.

`MessageReply` assembles one message; `MessageStreamReply` turns the stream into Anthropic's
documented event sequence: `message_start` (with the input tokens, which llama-gate's backend
reports before it processes the prompt), then per content block `content_block_start` /
`content_block_delta` (`text_delta`, `thinking_delta`, `input_json_delta`) / `content_block_stop`,
then `message_delta` (stop reason, stop sequence, cumulative usage) and `message_stop`. While the
request waits for its turn the stream carries `ping` events (see `Pinger`), so a client does not
give up on a busy model; a failure after the stream began is an `event: error`.

Reasoning (`<think>...</think>`) becomes `thinking` blocks (when the request enabled thinking), is
dropped, or stays inline in the text (`Thoughts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from enum import Enum
from typing import Any

from aiohttp import web

from proxy.dialects.anthropic_errors import error_event
from proxy.dialects.openai_answer import Answer
from proxy.dialects.openai_replies import collect
from proxy.dialects.reasoning import ThinkSplitter, split_text
from proxy.dialects.wire import SSE_CONTENT_TYPE, SSE_HEADERS, json_bytes, sse
from proxy.errors import UpstreamError
from proxy.pipeline.delivery import Delivery
from proxy.upstream.events import BackendAnswer, BackendBrokeOff, Chunk, Delta, Done, Usage

PING_SECONDS = 5.0
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use"}  # fmt: skip
_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")


class Thoughts(Enum):
    """What becomes of a model's reasoning on the Messages API."""

    BLOCKS = "blocks"  # thinking blocks: the request enabled thinking
    DROP = "drop"
    INLINE = "inline"  # in the text, tags and all (/v1/messages/think)


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_id(given: Any) -> str:
    """Anthropic's tool_use ids match ^[a-zA-Z0-9_-]+$; a backend's may not, or be missing."""
    cleaned = _NOT_ID.sub("_", given) if isinstance(given, str) else ""
    return cleaned or "toolu_" + uuid.uuid4().hex[:24]


def tool_input(arguments: Any) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is (the model's text if no object)."""
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def event(name: str, data: dict[str, Any]) -> bytes:
    return sse(json_bytes({"type": name, **data}), name)


def _usage(answer_usage: Any) -> dict[str, int]:
    """Anthropic's usage from the backend's; a count it did not give as an integer is 0 (a
    backend's odd usage must not fail an answer it has otherwise given). The prompt tokens the
    backend's prompt cache spared it are Anthropic's `cache_read_input_tokens`; `input_tokens`
    are the rest, as Anthropic counts them."""
    usage = answer_usage if isinstance(answer_usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = prompt if type(prompt) is int else 0
    cached = min(cached, prompt) if type(cached) is int and cached > 0 else 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": completion if type(completion) is int else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message(model: str, answer: Answer, thoughts: Thoughts) -> dict[str, Any]:
    """The Messages API's answer for one assembled OpenAI answer."""
    document = answer.document()
    choice = document["choices"][0] if document["choices"] else {"message": {}}
    said = choice.get("message") or {}
    text = said.get("content") or ""
    reasoning = said.get("reasoning_content") or ""
    if thoughts is not Thoughts.INLINE:
        more, text = split_text(text)
        reasoning += more
    content: list[dict[str, Any]] = []
    if reasoning and thoughts is Thoughts.BLOCKS:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text:
        content.append({"type": "text", "text": text})
    for call in said.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": tool_id(call.get("id")),
                        "name": function.get("name", ""),
                        "input": tool_input(function.get("arguments"))})  # fmt: skip
    stop_reason = STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn")
    if answer.stop_sequence is not None and stop_reason == "end_turn":
        stop_reason = "stop_sequence"
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": answer.stop_sequence if stop_reason == "stop_sequence" else None,
        "usage": _usage(answer.usage),
    }


class MessageReply:
    """One Messages answer, assembled from the backend's stream."""

    def __init__(self, model: str, thoughts: Thoughts) -> None:
        self._model = model
        self._thoughts = thoughts

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        if not answer.streamed:
            raise UpstreamError(502, "The model server answered without streaming; try again.")
        assembled = await collect(answer, "chat")
        body = json_bytes(message(self._model, assembled, self._thoughts))
        return delivery.whole(200, body, "application/json")


async def open_stream(delivery: Delivery) -> None:
    """Begin a streamed message's answer (once)."""
    if delivery.response is None:
        await delivery.open(200, SSE_CONTENT_TYPE, SSE_HEADERS)


class Pinger:
    """`ping` events while a streamed request waits for a backend: after `every` seconds of
    waiting the stream begins, so that the client does not give up on a busy model. Until then
    nothing is sent, and a refusal can still be a plain error answer."""

    def __init__(self, delivery: Delivery, every: float = PING_SECONDS) -> None:
        self._delivery = delivery
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._ping())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._opening is not None:  # never leave a stream half begun
            with contextlib.suppress(Exception):
                await self._opening
            self._opening = None

    async def _ping(self) -> None:
        await asyncio.sleep(self._every)
        self._opening = asyncio.create_task(open_stream(self._delivery))
        await asyncio.shield(self._opening)
        while True:
            await self._delivery.send(event("ping", {}))
            await asyncio.sleep(self._every)


class _Blocks:
    """The content blocks of a streamed message, opened and closed in order."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._index = -1
        self._kind: str | None = None
        self._tools: dict[int, int] = {}  # the backend's tool call index -> our block index

    async def write(self, kind: str, delta: dict[str, Any], start: dict[str, Any]) -> None:
        if self._kind != kind or kind == "tool_use":
            await self.close()
            self._index += 1
            self._kind = kind
            await self._delivery.send(
                event("content_block_start", {"index": self._index, "content_block": start})
            )
        if delta:
            await self._delivery.send(
                event("content_block_delta", {"index": self._index, "delta": delta})
            )

    async def tool(self, call: dict[str, Any]) -> None:
        backend_index = call.get("index", 0)
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        delta = {"type": "input_json_delta", "partial_json": arguments} if arguments else {}
        if backend_index not in self._tools:
            start = {"type": "tool_use", "id": tool_id(call.get("id")),
                     "name": function.get("name", ""), "input": {}}  # fmt: skip
            await self.write("tool_use", delta, start)
            self._tools[backend_index] = self._index
        elif delta:
            await self._delivery.send(
                event("content_block_delta", {"index": self._tools[backend_index], "delta": delta})
            )

    async def close(self) -> None:
        if self._kind is not None:
            await self._delivery.send(event("content_block_stop", {"index": self._index}))
            self._kind = None


class MessageStreamReply:
    """The backend's OpenAI stream as Anthropic's event sequence."""

    def __init__(self, model: str, thoughts: Thoughts, pinger: Pinger) -> None:
        self._model = model
        self._thoughts = thoughts
        self._pinger = pinger

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        await self._pinger.stop()
        await open_stream(delivery)
        assert delivery.response is not None
        try:
            await self._relay(answer, delivery)
        except BackendBrokeOff as exc:
            delivery.outcome.broken = True
            failure = UpstreamError(502, f"{exc}; try again.")
            await delivery.fail(502, str(exc), error_event(failure))
        return delivery.response

    async def _relay(self, answer: BackendAnswer, delivery: Delivery) -> None:
        if not answer.streamed:
            raise BackendBrokeOff("the model server answered without streaming")
        blocks = _Blocks(delivery)
        splitter = None if self._thoughts is Thoughts.INLINE else ThinkSplitter()
        usage: Usage | None = None
        started, finish = False, "stop"
        async for event in answer.events():
            if isinstance(event, Usage):
                usage = event
                started = started or await self._start(delivery, event)
            elif isinstance(event, Chunk):
                started = started or await self._start(delivery, usage)
                for delta in [d for d in event.deltas if d.index == 0][:1]:  # one asked for
                    finish = delta.finish or finish
                    await self._delta(blocks, splitter, delta)
            elif isinstance(event, Done):
                if splitter is not None:
                    await self._text(blocks, splitter.flush())
                if not started:
                    await self._start(delivery, event.usage)
                await self._end(delivery, blocks, event.usage, finish)
                return

    async def _start(self, delivery: Delivery, usage: Usage | None) -> bool:
        shell: dict[str, Any] = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**_usage(usage.openai() if usage else None), "output_tokens": 0},
        }
        await delivery.send(event("message_start", {"message": shell}))
        return True

    async def _delta(self, blocks: _Blocks, splitter: ThinkSplitter | None, delta: Delta) -> None:
        if delta.reasoning:
            await self._text(blocks, [(True, delta.reasoning)])
        if delta.text:
            pieces = splitter.feed(delta.text) if splitter is not None else [(False, delta.text)]
            await self._text(blocks, pieces)
        for call in delta.tool_calls:
            await blocks.tool(call)

    async def _text(self, blocks: _Blocks, pieces: list[tuple[bool, str]]) -> None:
        for is_reasoning, text in pieces:
            if not is_reasoning:
                delta = {"type": "text_delta", "text": text}
                await blocks.write("text", delta, {"type": "text", "text": ""})
            elif self._thoughts is Thoughts.BLOCKS:
                delta = {"type": "thinking_delta", "thinking": text}
                await blocks.write("thinking", delta, {"type": "thinking", "thinking": ""})

    async def _end(
        self, delivery: Delivery, blocks: _Blocks, usage: Usage | None, finish: str
    ) -> None:
        await blocks.close()
        stop_reason = STOP_REASONS.get(finish, "end_turn")
        stop = usage.stop_sequence if usage is not None else None
        if stop is not None and stop_reason == "end_turn":
            stop_reason = "stop_sequence"
        stop_sequence = stop if stop_reason == "stop_sequence" else None
        stopped = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        counts = _usage(usage.openai() if usage else None)
        await delivery.send(event("message_delta", {"delta": stopped, "usage": counts}))
        await delivery.send(event("message_stop", {}))
        await delivery.finish()
