"""The backend's answer, read once: its server-sent events as typed events, counted as they come.

llama-gate asks the backend for every chat and text completion as a stream with usage
(`proxy.dialects.openai_body`), whatever the client asked for, so every API reads the same
thing. This module is the one place that stream is read and parsed, and the one place where
tokens, the time to the first byte and how the answer ended are counted into the outcome. Each
API renders these events in its own shape (`proxy.dialects`); none reads SSE or counts tokens.

Events, in the order the backend sends them:
- `Chunk`: one completion chunk, its choices' pieces as `Delta`s (text, reasoning the backend
  split itself, tool call pieces, a finish reason); `raw` is the event as sent, so an OpenAI
  stream passes through without being encoded again;
- `Usage`: a usage report: a progress one before the prompt is read (so a client that leaves is
  charged its prompt), and the final one, exact, before `[DONE]`;
- `Ping`: a comment line the backend sends to keep the connection open;
- `Done`: `[DONE]`, the answer is whole.
A stream that ends without `[DONE]`, or that says it failed, raises `BackendBrokeOff`.

Counting: each chunk that carries something of the answer is one token until the final usage
replaces the running figures with the backend's exact ones (a request that asks the backend more
than once, the JSON-RPC tool loop, counts each answer on top of the ones before).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.upstream.outcome import Outcome
from proxy.upstream.sse import DONE, EventSplitter, data_of

FINISHES = frozenset({"stop", "length", "tool_calls", "function_call", "content_filter"})


class BackendBrokeOff(Exception):
    """The backend's answer ended before it was complete."""


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


@dataclass(frozen=True, slots=True)
class Chunk:
    raw: bytes  # the SSE event as the backend sent it, terminator included
    payload: dict[str, Any]
    deltas: tuple[Delta, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    raw: bytes
    payload: dict[str, Any]  # the whole usage event (choices: [], usage: {...})
    prompt: int | None
    completion: int | None
    cached: int | None  # of the prompt, from the backend's prompt cache
    stop_sequence: str | None  # the one that ended the answer, when llama-gate's backend says


@dataclass(frozen=True, slots=True)
class Ping:
    raw: bytes


@dataclass(frozen=True, slots=True)
class Done:
    raw: bytes
    usage: Usage | None  # the last usage report: the answer's exact figures


Event = Chunk | Usage | Ping | Done


@dataclass(eq=False)
class Tally:
    """Token counts of one request as its answers stream (see the module docstring)."""

    outcome: Outcome
    base_prompt: int = 0  # of earlier answers of the same request
    base_completion: int = 0
    base_cached: int = 0
    generated: int = 0  # chunks of this answer that carried something
    reported: int = 0  # completion tokens the backend's progress reports named

    @classmethod
    def on(cls, outcome: Outcome) -> Tally:
        return cls(
            outcome,
            outcome.prompt_tokens or 0,
            outcome.completion_tokens or 0,
            outcome.cached_tokens or 0,
        )

    def progress(self, usage: Usage) -> None:
        if usage.prompt is not None:
            self.outcome.prompt_tokens = self.base_prompt + usage.prompt
        if usage.completion is not None:
            self.reported = usage.completion
        self._completion()

    def chunk(self) -> None:
        self.generated += 1
        self._completion()

    def final(self, usage: Usage | None) -> None:
        if usage is None:
            return
        if usage.prompt is not None or usage.completion is not None:
            if usage.prompt is not None:
                self.outcome.prompt_tokens = self.base_prompt + usage.prompt
            self.outcome.completion_tokens = self.base_completion + (usage.completion or 0)
        if usage.cached is not None:
            self.outcome.cached_tokens = self.base_cached + usage.cached

    def _completion(self) -> None:
        self.outcome.completion_tokens = self.base_completion + max(self.generated, self.reported)


@dataclass(eq=False)
class EventStream:
    """The events of one backend answer, read from `response` as they arrive."""

    response: aiohttp.ClientResponse
    outcome: Outcome
    first_byte: Any  # called once the first answer chunk arrives (the time to first byte)
    limit: int | None = None  # most bytes to read (what is rendered is no larger)
    tally: Tally = field(init=False)
    received: int = 0

    def __post_init__(self) -> None:
        self.tally = Tally.on(self.outcome)

    async def __aiter__(self) -> AsyncIterator[Event]:
        splitter = EventSplitter()
        usage: Usage | None = None
        content = self.response.content
        while True:
            try:
                data = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BackendBrokeOff(
                    f"the backend's answer broke off: {type(exc).__name__}"
                ) from None
            if not data:
                raise BackendBrokeOff("the backend's stream ended before its [DONE]")
            self.received += len(data)
            if self.limit is not None and self.received > self.limit:
                raise AnswerLimit(self.limit)
            for raw in splitter.feed(data):
                event = self._parse(raw)
                if isinstance(event, Done):
                    self.tally.final(usage)
                    yield Done(event.raw, usage)
                    return
                if isinstance(event, Usage):
                    usage = event
                    self.tally.progress(event)
                elif isinstance(event, Chunk):
                    self.first_byte()  # the first chunk comes once the prompt is read
                    if _carries(event):
                        self.tally.chunk()
                yield event

    def _parse(self, raw: bytes) -> Event:
        data = data_of(raw)
        if data is None:
            return Ping(raw)
        if data.strip() == DONE:
            return Done(raw, None)
        try:
            payload = json.loads(data)
        except ValueError:
            return Ping(raw)  # not JSON: nothing of the answer
        if not isinstance(payload, dict):
            return Ping(raw)
        if "error" in payload and "choices" not in payload:
            raise BackendBrokeOff(f"the backend failed mid-answer: {_said(payload['error'])}")
        choices = payload.get("choices")
        if choices == [] and "usage" in payload:
            return _usage(raw, payload)
        return Chunk(raw, payload, _deltas(choices))


class AnswerLimit(Exception):
    """The answer grew past what is sent (LLAMA_PROXY_MAX_ANSWER_BYTES)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _said(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:120] if message else "no reason given"


def _usage(raw: bytes, payload: dict[str, Any]) -> Usage:
    usage = payload["usage"]
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    extra = payload.get("llama_gate")
    stop = extra.get("stop_sequence") if isinstance(extra, dict) else None
    return Usage(
        raw,
        payload,
        prompt if type(prompt) is int and prompt >= 0 else None,
        completion if type(completion) is int and completion >= 0 else None,
        cached if type(cached) is int and cached >= 0 else None,
        stop if isinstance(stop, str) else None,
    )


def _deltas(choices: Any) -> tuple[Delta, ...]:
    if not isinstance(choices, list):
        return ()
    deltas = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        index = index if type(index) is int else 0
        finish = choice.get("finish_reason")
        finish = finish if isinstance(finish, str) else None
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            reasoning = delta.get("reasoning_content")
            calls = delta.get("tool_calls")
            role = delta.get("role")
            deltas.append(
                Delta(
                    index,
                    text if isinstance(text, str) else "",
                    reasoning if isinstance(reasoning, str) else "",
                    tuple(c for c in calls if isinstance(c, dict))
                    if isinstance(calls, list)
                    else (),
                    role if isinstance(role, str) else None,
                    finish,
                    choice.get("logprobs"),
                )
            )
        else:  # a text completion's choice
            text = choice.get("text")
            deltas.append(
                Delta(
                    index,
                    text if isinstance(text, str) else "",
                    finish=finish,
                    logprobs=choice.get("logprobs"),
                )
            )
    return tuple(deltas)


def _carries(chunk: Chunk) -> bool:
    """Whether a chunk holds something of the answer (each such holds a token at least)."""
    return any(d.text or d.reasoning or d.tool_calls for d in chunk.deltas) or any(
        isinstance(c, dict) and isinstance(c.get("delta"), dict) and c["delta"].get("function_call")
        for c in chunk.payload.get("choices") or ()
    )
