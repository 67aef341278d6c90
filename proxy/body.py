"""Request bodies: read and checked where the proxy needs their content, streamed elsewhere.

Inference requests (`INSPECTED_PATHS`) are small JSON the proxy must understand (the model and
whether to stream, for the audit row and later for choosing a backend), so they are read whole
under the size cap and must be a JSON object. Any other body streams through untouched, counted
against the same cap.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.errors import BodyTooLarge, InvalidJson
from proxy.records import RequestRecord

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
    request: web.Request, path: str, record: RequestRecord, limit: int
) -> bytes | CappedBody | None:
    """What to send upstream: the checked bytes, a capped stream, or None for no body."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if request.method == "POST" and path in INSPECTED_PATHS:
        raw = await _read(request, limit, record)
        _inspect(raw, path, record)
        return raw
    if not request.body_exists:
        return None
    return CappedBody(request, limit, record)


async def _read(request: web.Request, limit: int, record: RequestRecord) -> bytes:
    chunks = []
    async for chunk in CappedBody(request, limit, record):
        chunks.append(chunk)
    return b"".join(chunks)


def _inspect(raw: bytes, path: str, record: RequestRecord) -> None:
    try:
        payload: Any = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidJson("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(payload, dict):
        raise InvalidJson("expected an object, got " + type(payload).__name__)
    model = payload.get("model")
    record.model = model if isinstance(model, str) else None
    if path in STREAMED_MODES:
        record.stream = payload.get("stream") is True
