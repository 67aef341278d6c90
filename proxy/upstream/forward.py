"""The streaming pass-through: one request to a backend, its response back as it arrives.

Bodies stream both ways and nothing is buffered, so each SSE event (pings and comments
included) reaches the client when the backend sends it. Only error responses, which are small,
are read: to rewrite the backend's own shapes (FastAPI's `{"detail": ...}`) into OpenAI's.
The backend response is closed in `finally` unless it was read to the end, so a client that
goes away (the handler is cancelled, see `create_app`) closes the backend's connection at once
and llama_cpp.server stops generating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import BodyTooLarge, UpstreamError, UpstreamUnreachable
from proxy.pipeline.records import CLIENT_CLOSED, RequestRecord
from proxy.upstream.backends import Upstream
from proxy.upstream.body import CappedBody
from proxy.upstream.errors import openai_error_body
from proxy.upstream.usage import UsageReader, reader_for

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
# Accept-Encoding is dropped because compression on loopback only delays SSE events.
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "content-length",
    "expect",
    "accept-encoding",
    "x-forwarded-for",
    "x-request-id",
}
RESPONSE_DROP = HOP_BY_HOP | {"server", "date", "www-authenticate"}
ERROR_BODY_LIMIT = 64 * 1024

NOT_REACHABLE = "The model server is not reachable"


def _named_in_connection(headers: Mapping[str, str]) -> set[str]:
    return {name.strip().lower() for name in headers.get("Connection", "").split(",")}


def upstream_headers(request: web.Request, upstream: Upstream, request_id: str) -> CIMultiDict[str]:
    drop = REQUEST_DROP | _named_in_connection(request.headers)
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    peer = request.remote or "unknown"
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Request-Id"] = request_id
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key.reveal()}"
    return headers


def _response_headers(
    upstream_response: aiohttp.ClientResponse, extra: Mapping[str, str]
) -> CIMultiDict[str]:
    drop = RESPONSE_DROP | _named_in_connection(upstream_response.headers)
    headers = CIMultiDict(
        (k, v) for k, v in upstream_response.headers.items() if k.lower() not in drop
    )
    headers.update(extra)
    headers["X-Accel-Buffering"] = "no"  # tell any proxy in front of us not to buffer SSE
    return headers


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    path: str,
    body: bytes | CappedBody | None,
    record: RequestRecord,
    extra_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Send the request to `upstream` and stream its answer back; `UpstreamError` if it fails."""
    extra = {**extra_headers, "X-Request-Id": record.request_id}
    called = time.monotonic()
    try:
        upstream_response = await session.request(
            request.method,
            upstream.url(path, request.rel_url.raw_query_string),
            headers=upstream_headers(request, upstream, record.request_id),
            data=body.__aiter__() if isinstance(body, CappedBody) else body,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(body, CappedBody) and body.exceeded:
            raise BodyTooLarge(body.limit) from None
        raise _failure(exc, upstream) from None
    finished = False
    try:
        if upstream_response.status >= 400:
            response: web.StreamResponse = await _error_response(upstream_response, record, extra)
        else:
            usage = reader_for(path, record, upstream_response.content_type)
            response = await _stream(request, upstream_response, record, extra, usage)
        finished = upstream_response.content.is_eof()
        return response
    finally:
        record.upstream_ms = (time.monotonic() - called) * 1000.0
        if finished:
            upstream_response.release()  # back to the keep-alive pool
        else:
            upstream_response.close()  # drop the connection: the backend sees the client leave


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


async def _error_response(
    upstream_response: aiohttp.ClientResponse, record: RequestRecord, extra: Mapping[str, str]
) -> web.Response:
    status = upstream_response.status
    raw = b""
    try:
        while len(raw) < ERROR_BODY_LIMIT and (chunk := await upstream_response.content.readany()):
            raw += chunk
    except (aiohttp.ClientError, TimeoutError):
        pass  # rewrite what we have
    if status in (401, 403):
        log.error(
            "the backend refused the proxy's key (HTTP %d): set LLAMA_SERVER_API_KEY to the key "
            "the backend was started with",
            status,
        )
        raise UpstreamError(
            502, f"{NOT_REACHABLE}: it refused the proxy's credentials. Tell your administrator."
        )
    body = openai_error_body(status, raw[:ERROR_BODY_LIMIT])
    record.error = str(body["error"]["message"])[:200]
    record.bytes_out = len(raw)
    return web.json_response(body, status=status, headers=extra)


async def _stream(
    request: web.Request,
    upstream_response: aiohttp.ClientResponse,
    record: RequestRecord,
    extra: Mapping[str, str],
    usage: UsageReader | None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream_response.status,
        reason=upstream_response.reason,
        headers=_response_headers(upstream_response, extra),
    )
    try:
        await response.prepare(request)
    except ConnectionResetError:  # gone before the first byte; the cancellation may lag behind
        record.status = CLIENT_CLOSED
        return response
    content = upstream_response.content
    while True:
        try:
            # readany hands over whatever has arrived, so an event is never held back waiting
            # for a fuller chunk.
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            record.error = f"the backend's response broke off: {type(exc).__name__}"
            log.warning("request %s: %s", record.request_id, record.error)
            # End without the final chunk, so the client sees a cut, not a complete answer.
            if request.transport is not None:
                request.transport.close()
            return response
        if not chunk:
            break
        if record.ttfb_ms is None:
            record.ttfb_ms = record.elapsed_ms()
        if usage is not None:
            chunk = usage.feed(chunk)
        if chunk and not await _send(response, chunk, record):
            return response
    if usage is not None:
        tail = usage.finish(record)
        if tail and not await _send(response, tail, record):
            return response
    try:
        await response.write_eof()
    except ConnectionResetError:  # gone just before the end: it did not get the whole answer
        record.status = CLIENT_CLOSED
        record.error = "client closed the connection"
    return response


async def _send(response: web.StreamResponse, chunk: bytes, record: RequestRecord) -> bool:
    """Write to the client; False (and status 499) when it has gone away."""
    try:
        await response.write(chunk)
    except ConnectionResetError:
        record.status = CLIENT_CLOSED
        record.error = "client closed the connection"
        return False
    record.bytes_out += len(chunk)
    return True
