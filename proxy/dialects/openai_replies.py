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
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
from aiohttp import web

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


def _is_sse(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


class Tokens:
    """Token counts as a stream goes: the backend's usage figures, and meanwhile its chunks.

    Usage events before the end are progress (the first names the prompt's tokens before they
    are even processed); each answer chunk carries at least one token. The usage the stream ends
    with is exact and replaces whatever was counted.
    """

    def __init__(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._generated = 0  # answer chunks seen
        self._reported = 0

    def progress(self, usage: Any) -> None:
        prompt, completion = _counts(usage)
        self._outcome.count(prompt, None)
        if completion is not None:
            self._reported = completion
        self._outcome.completion_tokens = max(self._generated, self._reported)

    def final(self, usage: Any) -> None:
        prompt, completion = _counts(usage)
        if prompt is not None or completion is not None:
            self._outcome.count(prompt, completion or 0)
        self._outcome.cached_tokens = cached_tokens(usage)

    def chunk(self, payload: dict[str, Any]) -> None:
        if any(_carries_text(choice) for choice in payload.get("choices") or ()):
            self._generated += 1
            self._outcome.completion_tokens = max(self._generated, self._reported)


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


def _event_json(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _usage_only(payload: dict[str, Any]) -> bool:
    return payload.get("choices") == [] and "usage" in payload


class StreamReply:
    """Relays the backend's SSE stream to a client that asked for one."""

    def __init__(self, usage_wanted: bool) -> None:
        self._usage_wanted = usage_wanted

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        if not _is_sse(response):
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
                payload = _event_json(data)
                if payload is not None and _usage_only(payload):
                    usage, usage_event = payload["usage"], event  # the last is the answer's
                    tokens.progress(usage)
                    continue
                if payload is not None:
                    tokens.chunk(payload)
                    delivery.first_byte()
                out.append(event)
            if out:
                await delivery.send(b"".join(out))
        raise BackendBrokeOff("the backend's stream ended before its [DONE]")


class AssembledReply:
    """Builds the one JSON answer of a chat (`chat`) or text (`text`) completion from a stream."""

    def __init__(self, kind: str) -> None:
        self._kind = kind

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
        if not _is_sse(response):
            return await BodyReply(counts_tokens=True).relay(response, delivery)
        tokens = Tokens(delivery.outcome)
        answer = Answer(self._kind)
        splitter = EventSplitter()
        async for chunk in backend_chunks(response):
            for event in splitter.feed(chunk):
                data = data_of(event)
                if data is None:
                    continue
                if data.strip() == DONE:
                    tokens.final(answer.usage)
                    body = json_bytes(answer.document())
                    return delivery.whole(200, body, "application/json")
                payload = _event_json(data)
                if payload is None:
                    continue
                if _usage_only(payload):
                    tokens.progress(payload["usage"])
                    answer.usage = payload["usage"]
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


class Answer:
    """One non-streamed answer, assembled from the chunks of its stream."""

    def __init__(self, kind: str) -> None:
        self._chat = kind == "chat"
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self._top:
                self._top[key] = chunk[key]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, piece: dict[str, Any]) -> None:
        index = piece.get("index", 0) if isinstance(piece.get("index"), int) else 0
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = self._new_choice(index)
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]
        if self._chat:
            _merge_delta(choice["message"], piece.get("delta"))
            _merge_chat_logprobs(choice, piece.get("logprobs"))
        else:
            if isinstance(piece.get("text"), str):
                choice["text"] += piece["text"]
            _merge_text_logprobs(choice, piece.get("logprobs"))

    def _new_choice(self, index: int) -> dict[str, Any]:
        if self._chat:
            message = {"role": "assistant", "content": None}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": None}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    def document(self) -> dict[str, Any]:
        choices = [self._choices[i] for i in sorted(self._choices)]
        for choice in choices:
            message = choice.get("message")
            if message is not None and message["content"] is None and "tool_calls" not in message:
                message["content"] = ""
        document = {
            "id": self._top.get("id", ""),
            "object": "chat.completion" if self._chat else "text_completion",
            "created": self._top.get("created", 0),
            "model": self._top.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._top:
            document["system_fingerprint"] = self._top["system_fingerprint"]
        if self.usage is not None:
            document["usage"] = self.usage
        return document


def _merge_delta(message: dict[str, Any], delta: Any) -> None:
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("role"), str):
        message["role"] = delta["role"]
    for key in ("content", "reasoning_content"):
        if isinstance(delta.get(key), str):
            message[key] = (message.get(key) or "") + delta[key]
    if isinstance(delta.get("function_call"), dict):
        _merge_call(message.setdefault("function_call", {}), delta["function_call"])
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls)) if isinstance(call.get("index"), int) else len(calls)
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        target = calls[index]
        for key in ("id", "type"):
            if isinstance(call.get(key), str) and call[key]:
                target[key] = call[key]
        if isinstance(call.get("function"), dict):
            _merge_call(target["function"], call["function"])


def _merge_call(target: dict[str, Any], piece: dict[str, Any]) -> None:
    if isinstance(piece.get("name"), str) and piece["name"]:
        target["name"] = piece["name"]
    if isinstance(piece.get("arguments"), str):
        target["arguments"] = target.get("arguments", "") + piece["arguments"]


def _merge_chat_logprobs(choice: dict[str, Any], logprobs: Any) -> None:
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        if choice["logprobs"] is None:
            choice["logprobs"] = {"content": []}
        choice["logprobs"]["content"].extend(logprobs["content"])


def _merge_text_logprobs(choice: dict[str, Any], logprobs: Any) -> None:
    if not isinstance(logprobs, dict):
        return
    keys = ("text_offset", "token_logprobs", "tokens", "top_logprobs")
    merged: dict[str, list[Any]] = choice["logprobs"] or {key: [] for key in keys}
    choice["logprobs"] = merged
    for key in keys:
        if isinstance(logprobs.get(key), list):
            merged[key].extend(logprobs[key])


MODEL_LIST_LIMIT = 1 << 20


class OneModelReply:
    """Answers with the entry of the backend's model list whose id is `model`, or a 404."""

    def __init__(self, model: str) -> None:
        self._model = model

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse:
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
        entries = [m for m in listed or () if isinstance(m, dict)]
        for entry in entries:
            if entry.get("id") == self._model:
                return delivery.whole(200, json_bytes(entry), "application/json")
        names = ", ".join(str(m.get("id")) for m in entries) or "none"
        raise ModelNotFound(self._model, names)
