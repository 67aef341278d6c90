"""Request bodies: read and checked where the proxy needs their content, streamed elsewhere.

Inference requests (`INSPECTED_PATHS`) are small JSON the proxy must understand (the model and
whether to stream, for the audit row and for choosing a backend), so they are read whole under the
size cap and must be a JSON object. Two things in them are rewritten: `max_tokens` is capped, so no
request holds the model for unbounded time, and streams ask the backend for a final usage chunk
(`stream_options.include_usage`) so their tokens can be counted; `proxy.upstream.usage` takes that
chunk out again for a client that did not ask for it. Any other body streams through untouched,
counted against the same cap.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.errors import BodyTooLarge, InvalidJson
from proxy.pipeline.records import RequestRecord

INSPECTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
STREAMED_MODES = frozenset({"/v1/chat/completions", "/v1/completions"})


class CappedBody:
    """The client's body as an async iterator that fails once it passes `limit` bytes."""

    def __init__(self, request: web.Request, limit: int, record: RequestRecord) -> None:
        self._content = request.content
        self.limit = limit
        self._record = record
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self._content.readany():
            self._record.bytes_in += len(chunk)
            if self._record.bytes_in > self.limit:
                self.exceeded = True
                raise BodyTooLarge(self.limit)
            yield chunk


async def prepare_body(
    request: web.Request, path: str, record: RequestRecord, limit: int, max_tokens: int
) -> bytes | CappedBody | None:
    """What to send upstream: the checked (maybe rewritten) bytes, a capped stream, or None."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if request.method == "POST" and path in INSPECTED_PATHS:
        raw = await _read(request, limit, record)
        payload = _inspect(raw, path, record)
        if path in STREAMED_MODES and _rewrite(payload, record, max_tokens):
            return json.dumps(payload, ensure_ascii=False).encode()
        return raw
    if not request.body_exists:
        return None
    return CappedBody(request, limit, record)


async def _read(request: web.Request, limit: int, record: RequestRecord) -> bytes:
    chunks = []
    async for chunk in CappedBody(request, limit, record):
        chunks.append(chunk)
    return b"".join(chunks)


def _inspect(raw: bytes, path: str, record: RequestRecord) -> dict[str, Any]:
    try:
        payload: Any = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidJson("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidJson("it is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidJson("expected an object, got " + type(payload).__name__)
    model = payload.get("model")
    record.model = model if isinstance(model, str) else None
    if path in STREAMED_MODES:
        record.stream = payload.get("stream") is True
    return payload


def _rewrite(payload: dict[str, Any], record: RequestRecord, max_tokens: int) -> bool:
    """Cap `max_tokens` and ask for usage on streams; True when the payload changed."""
    changed = False
    asked = payload.get("max_tokens")
    if not (type(asked) is int and 0 < asked <= max_tokens):
        # Missing, null, zero, negative, over the cap, or not a whole number: llama_cpp.server
        # reads <= 0 and null as "until the context is full" and turns "100000" or 1e5 into an
        # int, so anything but a whole number within the cap is sent as the cap.
        payload["max_tokens"] = max_tokens
        changed = True
    if record.stream:
        options = payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        record.usage_requested = options.get("include_usage") is True
        if not record.usage_requested:
            payload["stream_options"] = {**options, "include_usage": True}
            changed = True
    return changed
