"""Reading a request body under its size cap and its time limit, counted as it arrives.

Bodies the proxy inspects are small JSON documents, read whole. The size cap is enforced on what
arrives, not on what `Content-Length` claims, so a chunked or lying client cannot get past it; a
body that stalls is answered 408 (its request holds a concurrency place meanwhile, so a stalled
body costs its sender, nobody else). A client that asked `Expect: 100-continue` is told to go on
only now, after its key was checked and its place taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.errors import BodyTooLarge, ExpectationFailed, InvalidRequest, RequestTimeout
from proxy.lane import Lane

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def defer_continue(request: web.Request) -> None:
    """aiohttp's expect handler, which runs before any check: promise nothing yet."""


async def read_body(
    request: web.Request,
    limit: int,
    timeout: float,  # noqa: ASYNC109 - the body's own budget, answered with a 408 of its own
    received: Callable[[int], None],
    lane: Lane,
) -> bytes:
    """The whole body, or `BodyTooLarge` / `RequestTimeout` / `InvalidRequest`; `received` is
    told of each piece's size as it arrives (so a refused body's row says how much came). A body
    that came in pieces is put together at its turn in `lane`: copying megabytes takes
    milliseconds, and several bodies ending together would otherwise be copied back to back."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None:
        if expect.lower() != "100-continue":
            raise ExpectationFailed()
        await request.writer.write(CONTINUE)
    content = request.content
    chunks: list[bytes] = []
    size = 0
    try:
        if content.is_eof():  # it all came with the headers (most bodies): no wait, no timer
            body = content.read_nowait()
            received(len(body))
            if len(body) > limit:
                raise BodyTooLarge(limit)
            return body
        async with asyncio.timeout(timeout):
            while chunk := await content.readany():
                size += len(chunk)
                received(len(chunk))
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(timeout) from None
    except HttpProcessingError:
        raise InvalidRequest(
            "The request body is not well-formed HTTP (its length or chunked encoding is wrong)."
        ) from None
    return await lane.step(size, lambda: b"".join(chunks))
