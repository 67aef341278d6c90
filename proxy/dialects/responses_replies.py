"""Responses API answers, rendered from the backend's one event stream.

`Output` builds a response from the answer's pieces (text, reasoning, tool call pieces) and, for
a stream, the events OpenAI's API sends while it builds one, each with its `sequence_number`:
`response.created`, `response.in_progress`; per output item `response.output_item.added`, then
for a message `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, for reasoning
`response.reasoning_text.delta`... / `.done`, for a function call
`response.function_call_arguments.delta`... / `.done`; `response.output_item.done`; and at the
end `response.completed` (or `response.incomplete` when the answer reached max_output_tokens)
with the usage, cached prompt tokens included. A failure after the stream began is
`response.failed`; before, OpenAI's error JSON.

`ResponseReply` (one JSON response) and `ResponseStreamReply` feed the same `Output`, so both
give the same items and usage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.dialects.reasoning import ThinkSplitter
from proxy.dialects.wire import SSE_CONTENT_TYPE, SSE_HEADERS, json_bytes, sse
from proxy.pipeline.delivery import Delivery
from proxy.upstream.events import BackendAnswer, BackendBrokeOff, Chunk, Delta, Done, Usage


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_of(usage: Usage | None) -> dict[str, Any]:
    """The Responses API's usage from the backend's final report."""
    prompt = usage.prompt if usage is not None and usage.prompt is not None else 0
    completion = usage.completion if usage is not None and usage.completion is not None else 0
    cached = min(usage.cached or 0, prompt) if usage is not None else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class Output:
    """One response as it is built; `events` collects its stream's events when `streamed`."""

    def __init__(self, shell: dict[str, Any], streamed: bool) -> None:
        self.response = {**shell, "status": "in_progress", "output": [], "usage": None}
        self.items: list[dict[str, Any]] = self.response["output"]
        self._streamed = streamed
        self.events: list[bytes] = []
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the message or reasoning item being written
        self._calls: dict[int, dict[str, Any]] = {}  # the backend's tool call index -> item
        self._indexes: dict[str, int] = {}  # an item's id -> its place in the output
        self._splitter = ThinkSplitter()

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self._streamed:
            body = {"type": kind, "sequence_number": self._sequence, **data}
            self.events.append(sse(json_bytes(body), kind))
        self._sequence += 1

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self._indexes[item["id"]]}

    def start(self) -> None:
        self._event("response.created", {"response": self.response})
        self._event("response.in_progress", {"response": self.response})

    def delta(self, delta: Delta) -> None:
        if delta.reasoning:
            self._reasoning(delta.reasoning)
        if delta.text:
            for is_reasoning, text in self._splitter.feed(delta.text):
                self._reasoning(text) if is_reasoning else self._text(text)
        for piece in delta.tool_calls:
            self._tool(piece)

    def _text(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "message":
            item = self._add(
                {
                    "id": new_id("msg"),
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            self._event(
                "response.content_part.added",
                {**self._where(item), "content_index": 0, "part": dict(part)},
            )
        item["content"][0]["text"] += text
        self._event(
            "response.output_text.delta",
            {**self._where(item), "content_index": 0, "delta": text, "logprobs": []},
        )

    def _reasoning(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "reasoning":
            item = self._add(
                {
                    "id": new_id("rs"),
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}],
                }
            )
        item["content"][0]["text"] += text
        self._event(
            "response.reasoning_text.delta",
            {**self._where(item), "content_index": 0, "delta": text},
        )

    def _tool(self, piece: dict[str, Any]) -> None:
        index = piece.get("index", 0)
        function = piece.get("function") or {}
        arguments = function.get("arguments") or ""
        item = self._calls.get(index)
        if item is None:
            call_id = piece.get("id") if isinstance(piece.get("id"), str) else new_id("call")
            item = self._add(
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": call_id,
                    "name": function.get("name") or "",
                    "arguments": "",
                }
            )
            self._calls[index] = item
            self._open = None  # a call is never continued by text: the next text is a new item
        elif item["status"] != "in_progress":  # a late piece of a call already said whole
            item["arguments"] += arguments
            return
        if arguments:
            item["arguments"] += arguments
            self._event(
                "response.function_call_arguments.delta", {**self._where(item), "delta": arguments}
            )

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self._close()
        self._close_calls()  # each item is done before the next begins, as OpenAI's stream
        self._indexes[item["id"]] = len(self.items)
        self.items.append(item)
        self._event(
            "response.output_item.added",
            {"output_index": len(self.items) - 1, "item": _shown(item)},
        )
        if item["type"] != "function_call":
            self._open = item
        return item

    def _close_calls(self, cut: bool = False) -> None:
        """Say each function call whole (its arguments arrive in pieces, perhaps interleaved)."""
        for item in self._calls.values():
            if item["status"] != "in_progress":
                continue
            item["status"] = "incomplete" if cut else "completed"
            where = self._where(item)
            self._event(
                "response.function_call_arguments.done",
                {**where, "name": item["name"], "arguments": item["arguments"]},
            )
            self._event(
                "response.output_item.done", {"output_index": where["output_index"], "item": item}
            )

    def _close(self, cut: bool = False) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            self._event(
                "response.output_text.done",
                {**where, "content_index": 0, "text": part["text"], "logprobs": []},
            )
            self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
            item["status"] = "incomplete" if cut else "completed"
        else:
            text = item["content"][0]["text"]
            self._event("response.reasoning_text.done", {**where, "content_index": 0, "text": text})
        self._event(
            "response.output_item.done", {"output_index": where["output_index"], "item": item}
        )

    def finish(self, usage: Usage | None, finish: str | None) -> dict[str, Any]:
        """The answer is whole: close what is open and say how it ended."""
        for is_reasoning, text in self._splitter.flush():
            self._reasoning(text) if is_reasoning else self._text(text)
        self._close(cut=finish == "length")
        self._close_calls(cut=finish == "length")
        self.response["usage"] = usage_of(usage)
        if finish == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            self._event("response.incomplete", {"response": self.response})
        else:
            self.response["status"] = "completed"
            self._event("response.completed", {"response": self.response})
        return self.response

    def fail(self, message: str) -> bytes:
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        self._event("response.failed", {"response": self.response})
        return b"".join(self.events)

    def take(self) -> bytes:
        """The events made since the last call."""
        out, self.events = b"".join(self.events), []
        return out


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    """An item as `output_item.added` shows it: as it begins, nothing of its content yet."""
    return {**item, "content": []} if "content" in item else dict(item)


Finished = Callable[[dict[str, Any]], Awaitable[None]]  # given the whole response (to store)


async def build(
    answer: BackendAnswer, output: Output, each: Callable[[], Any] | None = None
) -> str | None:
    """Feed the backend's answer into `output`; after each batch, `each()` is awaited (a stream
    sends what was made). The answer's finish reason."""
    if not answer.streamed:
        raise BackendBrokeOff("the model server answered without streaming")
    finish: str | None = None
    usage: Usage | None = None
    async for batch in answer.batches():
        for event in batch:
            if isinstance(event, Chunk):
                for delta in event.deltas:
                    if delta.index == 0:  # one answer is asked for
                        finish = delta.finish or finish
                        output.delta(delta)
            elif isinstance(event, Done):
                usage = event.usage
        if each is not None:
            await each()
    output.finish(usage, finish)
    return finish


class ResponseReply:
    """One JSON response, built from the backend's stream."""

    def __init__(self, shell: dict[str, Any], finished: Finished) -> None:
        self._shell = shell
        self._finished = finished

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        output = Output(self._shell, streamed=False)
        await build(answer, output)  # a broken answer is the pipeline's UpstreamBrokeOff
        await self._finished(output.response)
        return delivery.whole(200, json_bytes(output.response), "application/json")


class ResponseStreamReply:
    """The response's events as OpenAI's API streams them."""

    def __init__(self, shell: dict[str, Any], finished: Finished) -> None:
        self._shell = shell
        self._finished = finished

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        output = Output(self._shell, streamed=True)
        response = await delivery.open(200, SSE_CONTENT_TYPE, SSE_HEADERS)
        output.start()

        async def send() -> None:
            sent = output.take()
            if sent:
                await delivery.send(sent)

        try:
            await build(answer, output, send)
        except BackendBrokeOff as exc:
            delivery.outcome.broken = True
            await delivery.fail(502, str(exc), output.fail(f"{exc}; try again."))
            return response
        await self._finished(output.response)  # stored before the client is told it is complete
        await send()
        await delivery.finish()
        return response


def shell(
    request: Any, model: str, tools: list[dict[str, Any]], max_output: int | None
) -> dict[str, Any]:
    """The response object's fields that come from the request."""
    text_format = request.text.format if request.text is not None else None
    choice = request.tool_choice
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": max_output,
        "model": model,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": {
            "effort": request.reasoning.effort if request.reasoning else None,
            "summary": None,
        },
        "store": bool(request.store is not False),
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "text": {
            "format": text_format.model_dump(by_alias=True, exclude_none=True)
            if text_format is not None
            else {"type": "text"}
        },
        "tool_choice": (
            choice if isinstance(choice, str) or choice is None else choice.model_dump()
        )
        or "auto",
        "tools": tools,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "truncation": "disabled",
        "user": request.user,
        "metadata": request.metadata or {},
    }
