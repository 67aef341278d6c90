"""The backend's answer, read once: its server-sent events as typed events, counted as they come.

llama-gate asks the backend for every chat and text completion as a stream with usage
(`proxy.dialects.openai_body`), whatever the client asked for, so every API reads the same
thing. `BackendAnswer` is the one place an answer is read: as events (`events()`), as raw bytes
passed through (`body()`: embeddings, the model list, a backend that answered JSON after all) or
as one small JSON document (`document()`); and the one place where tokens, the time to the first
byte and how the answer ended are counted. Each API renders the events in its own shape
(`proxy.dialects`); none reads SSE or counts tokens itself.

Events, in the order the backend sends them:
- `Chunk`: one completion chunk, its choices' pieces as `Delta`s (text, reasoning the backend
  split itself, tool call pieces, a finish reason); `raw` is the event as sent, so an OpenAI
  stream passes through without being encoded again;
- `Usage`: a usage report: a progress one before the prompt is read (so a client that leaves is
  charged its prompt), and the final one, exact, before `[DONE]`;
- `Ping`: a comment line the backend sends to keep the connection open;
- `Done`: `[DONE]`, the answer is whole, with the last usage report.
An answer that ends without `[DONE]`, or that says it failed, raises `BackendBrokeOff`.

Counting: each chunk that carries something of the answer is one token until the final usage
replaces the running figures with the backend's exact ones; a request that asks the backend more
than once (the JSON-RPC tool loop) counts each answer on top of the ones before.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.upstream.sse import DONE, EventSplitter, data_of

TAIL_BYTES = 4096  # a JSON answer's usage is in its last few hundred bytes
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')


class BackendBrokeOff(Exception):
    """The backend's answer ended before it was complete."""


class AnswerTooLong(Exception):
    """The answer grew past what is sent (LLAMA_PROXY_MAX_ANSWER_BYTES)."""


class Counts(Protocol):
    """Where a request's token counts go (its outcome)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None


@dataclass(frozen=True, slots=True)
class Delta:
    """What one chunk adds to one choice."""

    index: int = 0
    text: str = ""  # the answer's text (a chat's content, a completion's text)
    reasoning: str = ""  # reasoning the backend itself set apart (reasoning_content)
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI tool call pieces, merged by index
    role: str | None = None
    finish: str | None = None
    logprobs: Any = None
    function_call: dict[str, Any] | None = None  # the legacy form of a tool call piece


@dataclass(frozen=True, slots=True)
class Chunk:
    raw: bytes  # the SSE event as the backend sent it, terminator included
    payload: dict[str, Any]
    deltas: tuple[Delta, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    raw: bytes
    payload: dict[str, Any]  # the whole event (choices: [], usage: {...})
    prompt: int | None
    completion: int | None
    cached: int | None  # of the prompt, from the backend's prompt cache
    stop_sequence: str | None  # the one that ended the answer, when llama-gate's backend says

    def openai(self) -> dict[str, Any]:
        """The usage object as OpenAI's API gives it (llama-gate's own notes left out)."""
        usage = self.payload.get("usage")
        return dict(usage) if isinstance(usage, dict) else {}


@dataclass(frozen=True, slots=True)
class Ping:
    raw: bytes


@dataclass(frozen=True, slots=True)
class Done:
    raw: bytes
    usage: Usage | None  # the last usage report: the answer's exact figures


Event = Chunk | Usage | Ping | Done


class Tally:
    """One answer's token counts, written into the request's `Counts` as they come."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._base_prompt = counts.prompt_tokens or 0  # earlier answers of the same request
        self._base_completion = counts.completion_tokens or 0
        self._base_cached = counts.cached_tokens or 0
        self._generated = 0  # chunks of this answer that carried something
        self._reported = 0  # completion tokens the backend's progress reports named

    def progress(self, usage: Usage) -> None:
        if usage.prompt is not None:
            self._counts.prompt_tokens = self._base_prompt + usage.prompt
        if usage.completion is not None:
            self._reported = usage.completion
        self._completion()

    def chunk(self) -> None:
        self._generated += 1
        self._completion()

    def final(self, usage: Usage | None) -> None:
        """The answer's exact figures replace what was counted meanwhile."""
        if usage is None:
            return
        if usage.prompt is not None:
            self._counts.prompt_tokens = self._base_prompt + usage.prompt
        if usage.prompt is not None or usage.completion is not None:
            self._counts.completion_tokens = self._base_completion + (usage.completion or 0)
        if usage.cached is not None:
            self._counts.cached_tokens = self._base_cached + usage.cached

    def _completion(self) -> None:
        generated = max(self._generated, self._reported)
        self._counts.completion_tokens = self._base_completion + generated


class BackendAnswer:
    """A backend's successful answer, read once, in whichever way its renderer needs."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        counts: Counts,
        first_byte: Callable[[], None],
        limit: int,
    ) -> None:
        self.response = response
        self._counts = counts
        self._first_byte = first_byte  # told when the answer's first piece arrives
        self._limit = limit  # most bytes an answer may have (what is rendered is no larger)
        self._received = 0
        self.complete = False  # read to its end (so the connection can be kept)

    @property
    def streamed(self) -> bool:
        return self.response.content_type == "text/event-stream"

    @property
    def content_type(self) -> str:
        return self.response.headers.get("Content-Type", "application/json")

    async def _pieces(self) -> AsyncIterator[bytes]:
        """The answer's bytes as they arrive (never held back for a fuller piece)."""
        content = self.response.content
        while True:
            try:
                piece = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BackendBrokeOff(
                    f"the backend's answer broke off: {type(exc).__name__}"
                ) from None
            if not piece:
                return
            self._received += len(piece)
            if self._received > self._limit:
                raise AnswerTooLong(self._limit)
            yield piece

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The stream's events, counted, a list for each piece that arrived (so what came
        together can leave together); the last list ends with `Done`. `BackendBrokeOff` if the
        stream ends before its `[DONE]`."""
        tally = Tally(self._counts)
        splitter = EventSplitter()
        usage: Usage | None = None
        async for piece in self._pieces():
            batch: list[Event] = []
            for raw in splitter.feed(piece):
                event = _event(raw)
                if isinstance(event, Done):
                    tally.final(usage)
                    self.complete = True
                    batch.append(Done(event.raw, usage))
                    yield batch
                    return
                if isinstance(event, Usage):
                    usage = event
                    tally.progress(event)
                elif isinstance(event, Chunk):
                    self._first_byte()  # the first chunk comes once the prompt is read
                    if _carries(event):
                        tally.chunk()
                batch.append(event)
            if batch:
                yield batch
        raise BackendBrokeOff("the backend's stream ended before its [DONE]")

    async def events(self) -> AsyncIterator[Event]:
        """The stream's events one by one (see `batches`)."""
        async for batch in self.batches():
            for event in batch:
                yield event

    async def body(self, counted: bool) -> AsyncIterator[bytes]:
        """The answer's bytes as they arrive, for passing on; with `counted`, its usage is
        read from its last bytes (in bounded memory, however long the answer)."""
        tail = b""
        async for piece in self._pieces():
            self._first_byte()
            yield piece
            if counted:
                tail = (tail + piece)[-TAIL_BYTES:]
        self.complete = True
        if counted:
            Tally(self._counts).final(_usage_of(usage_in_tail(tail)))

    async def document(self, counted: bool = False) -> Any:
        """A small JSON answer, whole (within the answer's bound), or `BackendBrokeOff`; with
        `counted`, its usage is counted."""
        raw = b"".join([piece async for piece in self._pieces()])
        self.complete = True
        self._first_byte()
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BackendBrokeOff("the backend's answer is not JSON") from None
        if counted and isinstance(document, dict):
            Tally(self._counts).final(_usage_of(document.get("usage")))
        return document


def _event(raw: bytes) -> Event:
    data = data_of(raw)
    if data is None:
        return Ping(raw)
    if data.strip() == DONE:
        return Done(raw, None)
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Ping(raw)  # not JSON: nothing of the answer
    if not isinstance(payload, dict):
        return Ping(raw)
    choices = payload.get("choices")
    if "error" in payload and choices is None:
        raise BackendBrokeOff(f"the backend failed mid-answer: {_said(payload['error'])}")
    if choices == [] and "usage" in payload:
        return _usage_event(raw, payload)
    return Chunk(raw, payload, _deltas(choices))


def _said(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:120] if message else "no reason given"


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _usage_of(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    return _usage_event(b"", {"choices": [], "usage": usage})


def _usage_event(raw: bytes, payload: dict[str, Any]) -> Usage:
    usage = payload["usage"]
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    extra = payload.get("llama_gate")
    stop = extra.get("stop_sequence") if isinstance(extra, dict) else None
    return Usage(
        raw,
        payload,
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        _count(details.get("cached_tokens")) if isinstance(details, dict) else None,
        stop if isinstance(stop, str) else None,
    )


def _deltas(choices: Any) -> tuple[Delta, ...]:
    if not isinstance(choices, list):
        return ()
    return tuple(_delta(choice) for choice in choices if isinstance(choice, dict))


def _delta(choice: dict[str, Any]) -> Delta:
    index, finish = choice.get("index", 0), choice.get("finish_reason")
    index = index if type(index) is int else 0
    finish = finish if isinstance(finish, str) else None
    logprobs = choice.get("logprobs")
    delta = choice.get("delta")
    if not isinstance(delta, dict):  # a text completion's choice
        text = choice.get("text")
        return Delta(index, text if isinstance(text, str) else "", finish=finish, logprobs=logprobs)
    text, reasoning = delta.get("content"), delta.get("reasoning_content")
    calls, role, call = delta.get("tool_calls"), delta.get("role"), delta.get("function_call")
    return Delta(
        index,
        text if isinstance(text, str) else "",
        reasoning if isinstance(reasoning, str) else "",
        tuple(c for c in calls if isinstance(c, dict)) if isinstance(calls, list) else (),
        role if isinstance(role, str) else None,
        finish,
        logprobs,
        call if isinstance(call, dict) else None,
    )


def _carries(chunk: Chunk) -> bool:
    """Whether a chunk holds something of the answer (each such holds a token at least)."""
    return any(d.text or d.reasoning or d.tool_calls or d.function_call for d in chunk.deltas)


def usage_in_tail(tail: bytes) -> Any:
    """The `usage` object of a JSON document whose last bytes are `tail`, if they hold it."""
    matches = list(_USAGE_KEY.finditer(tail))
    if not matches:
        return None
    text = tail[matches[-1].end() :].decode("utf-8", "replace")
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return value


# raw_decode reads a value at the start of a longer text (orjson has no such call).
_DECODER = json.JSONDecoder()
