"""Token accounting on the way back: usage read from responses as they stream through.

A non-streamed answer carries `usage` in its JSON body. A streamed one carries it in a last SSE
event (`"choices": []`) that the proxy asked the backend for (see `proxy.upstream.body`); when the
client did not ask for it itself, that one event is dropped, so the client receives exactly the
stream it asked for. Everything else passes through unchanged and unheld: only an event that has not
fully arrived is held back, until its end arrives.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

from proxy.pipeline.records import RequestRecord
from proxy.upstream.body import INSPECTED_PATHS

# Blank lines end SSE events; servers use LF or CRLF (sse-starlette's pings default to CRLF).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_KEY = b'"usage"'
BODY_LIMIT = 1 << 20  # a non-streamed answer larger than this is passed on without counting


class UsageReader(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the backend; return what to send to the client now."""
        ...

    def finish(self, record: RequestRecord) -> bytes:
        """The response ended: return what is still held, and note the usage on the record."""
        ...


def reader_for(path: str, record: RequestRecord, content_type: str) -> UsageReader | None:
    """How to read the usage of this answer, or None for answers that carry none."""
    if path not in INSPECTED_PATHS:
        return None  # models, tokenize, ...: nothing to count
    if record.stream and content_type.startswith("text/event-stream"):
        return StreamUsage(drop=not record.usage_requested)
    if content_type.startswith("application/json"):
        return BodyUsage()
    return None


def _counts(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def _note(record: RequestRecord, counts: tuple[int, int] | None) -> None:
    if counts is not None:
        record.prompt_tokens, record.completion_tokens = counts


class StreamUsage:
    """Watches an SSE stream for the usage event; drops it when `drop` is set."""

    def __init__(self, drop: bool) -> None:
        self._drop = drop
        self._held = b""
        self._counts: tuple[int, int] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        ends = [m.end() for m in _EVENT_END.finditer(data)]
        if not ends:
            self._held = data
            return b""
        complete, self._held = data[: ends[-1]], data[ends[-1] :]
        if _USAGE_KEY not in complete:  # every event but the last: pass through untouched
            return complete
        kept: list[bytes] = []
        start = 0
        for end in ends:
            event = complete[start:end]
            start = end
            counts = _usage_event(event) if _USAGE_KEY in event else None
            if counts is not None:
                self._counts = counts
                if self._drop:
                    continue
            kept.append(event)
        return b"".join(kept)

    def finish(self, record: RequestRecord) -> bytes:
        _note(record, self._counts)
        held, self._held = self._held, b""
        return held


def _usage_event(event: bytes) -> tuple[int, int] | None:
    """The counts of a usage-only event (`"choices": []` and a usage object), else None."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    try:
        payload = json.loads(b"\n".join(line[5:].lstrip(b" ") for line in lines))
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("choices") != []:
        return None
    return _counts(payload.get("usage"))


class BodyUsage:
    """Keeps a copy of a JSON answer (up to `BODY_LIMIT`) to read its usage at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._size <= BODY_LIMIT:
            self._parts.append(chunk)
            self._size += len(chunk)
        return chunk

    def finish(self, record: RequestRecord) -> bytes:
        if self._size <= BODY_LIMIT:
            try:
                payload = json.loads(b"".join(self._parts))
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                _note(record, _counts(payload.get("usage")))
        return b""
