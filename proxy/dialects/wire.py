"""Bytes on the wire, the same for every API: JSON documents and server-sent events."""

from __future__ import annotations

import json
from typing import Any

import orjson

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_bytes(value: Any) -> bytes:
    """UTF-8 JSON; a text holding a lone surrogate (which UTF-8 cannot) is escaped instead."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def sse(data: bytes, name: str | None = None) -> bytes:
    """One server-sent event carrying `data` (one line: JSON never needs more)."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + data + b"\n\n"
