"""One call to a backend: the request sent, its answer handed over to be read once.

`forward` connects, sends the proxy's own checked body with the backend's key (none of the
client's headers travel on: the backend needs none of them, and none of them should reach it),
translates the backend's own errors and failures into the proxy's, and gives the connection back
when the answer is done with: to the keep-alive pool when it was read to its end, otherwise
closed, so a backend whose client left stops generating at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import aiohttp
import msgspec

from proxy.errors import ApiError, UpstreamError, UpstreamUnreachable
from proxy.upstream.backends import Upstream
from proxy.upstream.errors import backend_refusal, openai_error_body
from proxy.upstream.events import BackendAnswer, Counts

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024
# After the answer's last event, how long the backend may take to end its response before the
# connection is closed rather than kept for the next request.
DRAIN_SECONDS = 1.0

NOT_REACHABLE = "The model server is not reachable"


@dataclass(frozen=True)
class UpstreamCall:
    """What to ask a backend: a JSON body (already checked and normalized) or none."""

    method: str
    path: str
    json: Mapping[str, Any] | None = None
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def data(self) -> bytes | None:
        """The body as sent, serialized once (measured, then forwarded)."""
        return msgspec.json.encode(self.json) if self.json is not None else None

    def answer_at_most(self, tokens: int) -> UpstreamCall:
        """This call with its answer's `max_tokens` lowered to `tokens` (if it was higher)."""
        body = self.json
        asked = body.get("max_tokens") if body is not None else None
        if body is None or (type(asked) is int and asked <= tokens):
            return self
        return replace(self, json={**body, "max_tokens": tokens})


@dataclass(frozen=True)
class Sender:
    """Who a call is made for: the proxy's request id and the client's address."""

    request_id: str
    client_addr: str | None


@asynccontextmanager
async def forward(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    call: UpstreamCall,
    sender: Sender,
    counts: Counts,
    first_byte: Callable[[], None],
    limit: int,
) -> AsyncIterator[BackendAnswer]:
    """Call `upstream`; its successful answer, to be read once while this is held; an
    `ApiError` when it refused the call or could not be reached."""
    headers = {"X-Request-Id": sender.request_id, **call.headers}
    if sender.client_addr:
        headers["X-Forwarded-For"] = sender.client_addr
    body = call.data
    if body is not None:
        headers["Content-Type"] = "application/json"
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key.reveal()}"
    try:
        response = await session.request(
            call.method,
            upstream.url(call.path, call.query),
            headers=headers,
            data=body,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _failure(exc, upstream) from None
    try:
        if response.status >= 400:
            raise await _backend_error(response, upstream)
        answer = BackendAnswer(response, counts, first_byte, limit)
        yield answer
        if answer.complete and not response.content.is_eof():
            await _drain(response)
    finally:
        if response.content.is_eof():
            response.release()  # back to the keep-alive pool
        else:
            response.close()  # drop the connection: the backend sees the client leave


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what the backend still sends after the answer's end, so its connection is reused."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        pass


def _failure(exc: aiohttp.ClientError | TimeoutError, upstream: Upstream) -> UpstreamError:
    log.warning("backend %s failed: %s: %s", upstream.name, type(exc).__name__, exc)
    if isinstance(exc, TimeoutError):
        return UpstreamError(504, f"{NOT_REACHABLE}: it did not answer in time. Try again.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnreachable(
            f"{NOT_REACHABLE}: it is not running or still starting. Try again shortly."
        )
    return UpstreamError(
        502, f"{NOT_REACHABLE}: it closed the connection without an answer. Try again."
    )


async def _backend_error(response: aiohttp.ClientResponse, upstream: Upstream) -> ApiError:
    """The backend's own error answer, as the proxy's own error, safe to show the client."""
    status = response.status
    raw = b""
    try:
        while len(raw) < ERROR_BODY_LIMIT and (chunk := await response.content.readany()):
            raw += chunk
    except (aiohttp.ClientError, TimeoutError):
        pass  # rewrite what we have
    if status in (401, 403):
        log.error(
            "the backend refused the proxy's key (HTTP %d): set LLAMA_SERVER_API_KEY to the key "
            "the backend was started with",
            status,
        )
        return UpstreamError(
            502, f"{NOT_REACHABLE}: it refused the proxy's credentials. Tell your administrator."
        )
    error = openai_error_body(status, raw[:ERROR_BODY_LIMIT])["error"]
    if status >= 500:
        # A backend's 500 may carry a traceback or its file paths: those are for the log.
        log.error("backend %s failed a request (HTTP %d): %s", upstream.name, status, error)
        return UpstreamError(
            502, "The model server failed on this request; the error is logged. Try again."
        )
    # Its own words stay in the log (they may hold file paths); the client gets the proxy's.
    log.info("backend %s refused a request (HTTP %d): %s", upstream.name, status, error)
    return backend_refusal(status, error)
