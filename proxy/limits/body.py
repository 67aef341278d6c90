"""Reading a request body under its size cap, counted as it arrives.

Bodies the proxy inspects are small JSON documents, read whole; the cap is enforced on what
arrives, not on what `Content-Length` claims, so a chunked or lying client cannot get past it.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BodyTooLarge
from proxy.upstream.outcome import Outcome


async def read_body(request: web.Request, limit: int, outcome: Outcome) -> bytes:
    """The whole body, or `BodyTooLarge` as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    while chunk := await request.content.readany():
        outcome.bytes_in += len(chunk)
        if outcome.bytes_in > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
