"""Server-sent events as they arrive: complete events out, a partial one held until it ends."""

from __future__ import annotations

import re

# Blank lines end SSE events; servers use LF or CRLF (sse-starlette's pings default to CRLF).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
DONE = b"[DONE]"


class EventSplitter:
    """Feed it bytes; it hands back each complete event, terminator included, exactly once."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._held + chunk if self._held else chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._held = data[start:]
        return events

    @property
    def pending(self) -> bytes:
        """The start of an event whose end has not arrived."""
        return self._held


def data_of(event: bytes) -> bytes | None:
    """The payload of an event's `data:` lines, or None for an event without any (a comment)."""
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
