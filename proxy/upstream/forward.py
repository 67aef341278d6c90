"""One call to a backend: the request sent, the answer handed to a `Reply` as it arrives.

The reply (chosen by the route's dialect) turns the backend's answer into the client's and
records what happened in the outcome; this module only connects, sends, translates the backend's
own errors and failures, and gives the connection back: to the keep-alive pool when the answer
was read to its end, otherwise closed, so a backend whose client left stops generating at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import ApiError, UpstreamError, UpstreamUnreachable
from proxy.upstream.backends import Upstream
from proxy.upstream.delivery import ClientGone, Delivery
from proxy.upstream.errors import backend_refusal, openai_error_body

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials never travel on; aiohttp sets the length and framing itself.
# Accept-Encoding is dropped because compression on loopback only delays SSE events; the
# client's X-Request-Id is replaced by ours, which llama_cpp.server accepts (it wants a UUID).
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "content-length",
    "content-type",
    "expect",
    "accept-encoding",
    "x-forwarded-for",
    "x-request-id",
    "origin",
    "cookie",
}
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
        # ASCII-escaped: a lone surrogate, should one get here, travels as a JSON escape.
        return json.dumps(self.json).encode() if self.json is not None else None

    def answer_at_most(self, tokens: int) -> UpstreamCall:
        """This call with its answer's `max_tokens` lowered to `tokens` (if it was higher)."""
        body = self.json
        asked = body.get("max_tokens") if body is not None else None
        if body is None or (type(asked) is int and asked <= tokens):
            return self
        return replace(self, json={**body, "max_tokens": tokens})


class Reply(Protocol):
    """Turns a backend's successful answer into the client's, through `delivery`."""

    async def relay(
        self, response: aiohttp.ClientResponse, delivery: Delivery
    ) -> web.StreamResponse: ...


class BackendBrokeOff(Exception):
    """The backend's answer ended before it was complete."""


async def backend_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The answer's bytes as they arrive (never held back for a fuller chunk)."""
    content = response.content
    while True:
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendBrokeOff(f"the backend's answer broke off: {type(exc).__name__}") from None
        if not chunk:
            return
        yield chunk


def _named_in_connection(headers: Mapping[str, str]) -> set[str]:
    return {name.strip().lower() for name in headers.get("Connection", "").split(",")}


def upstream_headers(
    request: web.Request, upstream: Upstream, request_id: str, extra: Mapping[str, str]
) -> CIMultiDict[str]:
    drop = REQUEST_DROP | _named_in_connection(request.headers)
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    peer = request.remote or "unknown"
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Request-Id"] = request_id
    headers.update(extra)
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key.reveal()}"
    return headers


async def forward(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    call: UpstreamCall,
    reply: Reply,
    delivery: Delivery,
    request_id: str,
) -> web.StreamResponse:
    """Call `upstream` and relay its answer; `ApiError` when no answer could be relayed."""
    body = call.data
    extra = dict(call.headers)
    if body is not None:
        extra["Content-Type"] = "application/json"
    try:
        response = await session.request(
            call.method,
            upstream.url(call.path, call.query),
            headers=upstream_headers(delivery.request, upstream, request_id, extra),
            data=body,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _failure(exc, upstream) from None
    try:
        if response.status >= 400:
            raise await _backend_error(response, upstream)
        try:
            answered = await reply.relay(response, delivery)
        except BackendBrokeOff as exc:
            log.warning("request %s: %s", request_id, exc)
            if delivery.response is None:  # nothing sent yet: the client gets a plain 502
                raise UpstreamError(502, f"{NOT_REACHABLE}: {exc}. Try again.") from None
            delivery.broke_off(str(exc))
            return delivery.response
        except ClientGone:
            assert delivery.response is not None
            return delivery.response
        if delivery.outcome.complete and not response.content.is_eof():
            await _drain(response)
        return answered
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
    """The backend's own error answer, in OpenAI's vocabulary, safe to show the client."""
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
