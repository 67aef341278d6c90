"""OpenAI answers: the backend's stream relayed event by event, or assembled into one document.

Every chat or text completion reaches the backend as a stream (`proxy.dialects.openai_body`):
- `StreamReply` relays it to a client that asked for a stream, event by event as each arrives,
  with the usage events (which the proxy asked for) held back and passed on only when the client
  asked for usage itself, as the last event before `[DONE]`, exactly as OpenAI sends it;
- `AssembledReply` builds the one JSON answer a client that did not ask for a stream expects;
- `BodyReply` passes any other answer through as it arrives (embeddings, models, a backend that
  answered in JSON after all), reading its usage from the end of the body in bounded memory.

All three count tokens into the outcome as they go: the usage events' figures, and meanwhile one
token per answer chunk, so a client that leaves half-way is charged what was generated until then.
A stream counts as received whole once its `[DONE]` is written; a backend stream that ends without
one broke off.

A chat answer's `<think>...</think>` reasoning is split out as `reasoning_content` (in the message,
or in each chunk's delta), dropped, or kept inline as generated (`proxy.dialects.reasoning`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
from aiohttp import web

from proxy.dialects.openai_answer import Answer
from proxy.dialects.reasoning import Reasoning, ThinkSplitter
from proxy.errors import ModelNotFound
from proxy.upstream.delivery import Delivery
from proxy.upstream.forward import BackendBrokeOff, backend_chunks
from proxy.upstream.outcome import Outcome
from proxy.upstream.sse import DONE, EventSplitter, data_of

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TAIL_BYTES = 4096  # a JSON answer's usage is in its last few hundred bytes
_USAGE = re.compile(rb'"usage"\s*:\s*')


def json_bytes(value: Any) -> bytes:
    """UTF-8 JSON; escaped to ASCII only when the text holds a lone surrogate UTF-8 cannot."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


def is_sse(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


class Tokens:
    """Token counts as a stream goes: the backend's usage figures, and meanwhile its chunks.

    Usage events before the end are progress (the first names the prompt's tokens before they
    are even processed); each answer chunk carries at least one token. The usage the stream ends
    with is exact and replaces whatever was counted. A request that asks the backend more than
    once (the JSON-RPC tool loop) counts each answer on top of the ones before.
    """

    def __init__(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._base_prompt = outcome.prompt_tokens or 0  # earlier answers of the same request
        self._base_completion = outcome.completion_tokens or 0
        self._base_cached = outcome.cached_tokens or 0
        self._generated = 0  # answer chunks seen
        self._reported = 0

    def progress(self, usage: Any) -> None:
        prompt, completion = _counts(usage)
        if prompt is not None:
            self._outcome.count(self._base_prompt + prompt, None)
        if completion is not None:
            self._reported = completion
        self._count_completion()

    def final(self, usage: Any) -> None:
        prompt, completion = _counts(usage)
        if prompt is not None or completion is not None:
            self._outcome.count(
                None if prompt is None else self._base_prompt + prompt,
                self._base_completion + (completion or 0),
            )
        cached = cached_tokens(usage)
        if cached is not None:
            self._outcome.cached_tokens = self._base_cached + cached

    def chunk(self, payload: dict[str, Any]) -> None:
        if any(_carries_text(choice) for choice in payload.get("choices") or ()):
            self._generated += 1
            self._count_completion()

    def _count_completion(self) -> None:
        generated = max(self._generated, self._reported)
        self._outcome.completion_tokens = self._base_completion + generated


def _counts(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if type(prompt) is int else None,
        completion if type(completion) is int else None,
    )


def cached_tokens(usage: Any) -> int | None:
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`, when the usage holds it."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if type(cached) is int and cached >= 0 else None


def _carries_text(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(
        delta.get(key) for key in ("content", "tool_calls", "function_call", "reasoning_content")
    )


def event_json(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def usage_only(payload: dict[str, Any]) -> bool:
    return payload.get("choices") == [] and "usage" in payload


class ChunkReasoning:
    """Takes each chunk's reasoning out of `delta.content`, choice by choice, as text streams."""

    def __init__(self, mode: Reasoning) -> None:
        self._mode = mode
        self._splitters: dict[object, ThinkSplitter] = {}

    def rewrite(self, payload: dict[str, Any]) -> bool | None:
        """Rewrite the chunk in place: False when nothing of it is left to send, None when it
        is unchanged (its bytes can go on as they came), True when it changed."""
        worth_sending, changed = False, False
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                worth_sending = True
                continue
            splitter = self._splitters.setdefault(choice.get("index", 0), ThinkSplitter())
            content = delta.get("content")
            pieces = splitter.feed(content) if isinstance(content, str) else []
            finished = choice.get("finish_reason") is not None
            if finished:
                pieces += splitter.flush()
            if isinstance(content, str) or pieces:
                answer = "".join(text for thought, text in pieces if not thought)
                thoughts = "".join(text for thought, text in pieces if thought)
                changed = changed or answer != content or bool(thoughts)
                delta["content"] = answer
                if thoughts and self._mode is Reasoning.SPLIT:
                    delta["reasoning_content"] = delta.get("reasoning_content", "") + thoughts
            worth_sending = worth_sending or finished or any(
                delta.get(key) for key in ("role", "content", "reasoning_content", "tool_calls",
                                           "function_call")
            ) or bool(choice.get("logprobs"))  # fmt: skip
        if not (worth_sending or not payload.get("choices")):
            return False
        return True if changed else None


class StreamReply:
    """Relays the backend's SSE stream to a client that asked for one."""

    def __init__(self, usage_wanted: bool, reasoning: Reasoning = Reasoning.KEEP) -> None:
        self._usage_wanted = usage_wanted
        self._reasoning = None if reasoning is Reasoning.KEEP else ChunkReasoning(reasoning)

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        if not is_sse(response):
            return await BodyReply(counts_tokens=True).relay(response, delivery)
        await delivery.open(200, "text/event-stream; charset=utf-8", SSE_HEADERS)
        tokens = Tokens(delivery.outcome)
        splitter = EventSplitter()
        usage_event, usage = b"", None
        async for chunk in backend_chunks(response):
            out: list[bytes] = []
            for event in splitter.feed(chunk):
                data = data_of(event)
                if data is None:  # a comment (keep-alive ping): on its way at once
                    out.append(event)
                    continue
                if data.strip() == DONE:
                    tokens.final(usage)
                    if self._usage_wanted:
                        out.append(usage_event)
                    out.append(event)
                    await delivery.send(b"".join(out))
                    await delivery.finish()
                    assert delivery.response is not None
                    return delivery.response
                payload = event_json(data)
                if payload is not None and usage_only(payload):
                    usage, usage_event = payload["usage"], event  # the last is the answer's
                    if payload.pop("llama_gate", None) is not None:  # the backend's, not OpenAI's
                        usage_event = b"data: " + json_bytes(payload) + b"\n\n"
                    tokens.progress(usage)
                    continue
                if payload is not None:
                    tokens.chunk(payload)
                    delivery.first_byte()
                    if self._reasoning is not None:
                        rewritten = self._reasoning.rewrite(payload)
                        if rewritten is False:
                            continue
                        if rewritten:
                            event = b"data: " + json_bytes(payload) + b"\n\n"
                out.append(event)
            if out:
                await delivery.send(b"".join(out))
        raise BackendBrokeOff("the backend's stream ended before its [DONE]")


class AssembledReply:
    """Builds the one JSON answer of a chat (`chat`) or text (`text`) completion from a stream."""

    def __init__(self, kind: str, reasoning: Reasoning = Reasoning.KEEP) -> None:
        self._kind = kind
        self._reasoning = reasoning

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        if not is_sse(response):
            return await BodyReply(counts_tokens=True).relay(response, delivery)
        answer = await collect(response, delivery, self._kind)
        body = json_bytes(answer.document(self._reasoning))
        return delivery.whole(200, body, "application/json")


async def assemble(
    response: aiohttp.ClientResponse, delivery: Delivery, kind: str
) -> dict[str, Any]:
    """The one answer document the backend's stream (`kind` chat or text) adds up to."""
    return (await collect(response, delivery, kind)).document()


async def collect(response: aiohttp.ClientResponse, delivery: Delivery, kind: str) -> Answer:
    """The backend's whole SSE stream as one answer, tokens counted as it arrives."""
    tokens = Tokens(delivery.outcome)
    answer = Answer(kind)
    splitter = EventSplitter()
    received = 0
    async for chunk in backend_chunks(response):
        received += len(chunk)
        delivery.check_size(received)  # what is assembled is no larger than what arrived
        for event in splitter.feed(chunk):
            data = data_of(event)
            if data is None:
                continue
            if data.strip() == DONE:
                tokens.final(answer.usage)
                return answer
            payload = event_json(data)
            if payload is None:
                continue
            if usage_only(payload):
                tokens.progress(payload["usage"])
                answer.usage = payload["usage"]
                answer.note_backend(payload.get("llama_gate"))
                continue
            tokens.chunk(payload)
            delivery.first_byte()
            answer.add(payload)
    raise BackendBrokeOff("the backend's stream ended before its [DONE]")


class BodyReply:
    """Passes an answer through as it arrives; reads its usage from its last bytes."""

    def __init__(self, counts_tokens: bool) -> None:
        self._counts_tokens = counts_tokens

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        content_type = response.headers.get("Content-Type", "application/json")
        await delivery.open(response.status, content_type)
        tail = b""
        async for chunk in backend_chunks(response):
            delivery.first_byte()
            await delivery.send(chunk)
            if self._counts_tokens:
                tail = (tail + chunk)[-TAIL_BYTES:]
        if self._counts_tokens:
            Tokens(delivery.outcome).final(usage_in_tail(tail))
        await delivery.finish()
        assert delivery.response is not None
        return delivery.response


def usage_in_tail(tail: bytes) -> Any:
    """The `usage` object of a JSON document whose last bytes are `tail`, if they hold it."""
    matches = list(_USAGE.finditer(tail))
    if not matches:
        return None
    text = tail[matches[-1].end() :].decode("utf-8", "replace")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value


MODEL_LIST_LIMIT = 1 << 20


class OneModelReply:
    """Answers with the entry of the backend's model list whose id is `model`, or a 404."""

    def __init__(self, model: str) -> None:
        self._model = model

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        entries = await model_list(response, delivery)
        for entry in entries:
            if entry.get("id") == self._model:
                return delivery.whole(200, json_bytes(entry), "application/json")
        names = ", ".join(str(m.get("id")) for m in entries) or "none"
        raise ModelNotFound(self._model, names)


async def model_list(response: aiohttp.ClientResponse, delivery: Delivery) -> list[dict[str, Any]]:
    """The entries of the backend's model list (`GET /v1/models`)."""
    raw = b""
    async for chunk in backend_chunks(response):
        delivery.first_byte()
        raw += chunk
        if len(raw) > MODEL_LIST_LIMIT:
            raise BackendBrokeOff("the backend's model list is too long to read")
    try:
        listed = json.loads(raw).get("data")
    except (ValueError, AttributeError):
        listed = None
    return [m for m in listed or () if isinstance(m, dict)]
