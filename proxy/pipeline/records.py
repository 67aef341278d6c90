"""One small record per API request, handed to completion hooks however the request ends.

The middleware is the single place where a request's life ends: success, any error answer
(401, 429, 413, 400, 5xx), an upstream failure mid-stream, or the client going away (499). The
audit writer registers a hook in `appkeys.COMPLETION_HOOKS`; hooks are plain callables run on the
event loop, so they must only enqueue (never wait), and one that raises is logged and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer was complete"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(eq=False)
class RequestRecord:
    request_id: str
    method: str
    path: str
    client_addr: str | None
    started_at: datetime  # wall clock, for the audit row
    user_id: int | None = None
    username: str | None = None
    key_id: str | None = None
    model: str | None = None
    stream: bool | None = None
    upstream: str | None = None  # name of the backend that served it
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    queue_ms: float | None = None  # waiting for a backend slot (the scheduler's share)
    ttfb_ms: float | None = None  # until the backend's first body byte
    upstream_ms: float | None = None  # from calling the backend to its last byte
    duration_ms: float | None = None
    error: str | None = None  # short, safe to store: never a key or a body
    usage_requested: bool = False  # the client itself asked for a usage chunk on its stream
    prompt_tokens: int | None = None  # from the backend's usage, streamed or not
    completion_tokens: int | None = None
    start: float = field(default_factory=time.monotonic, repr=False)  # monotonic clock

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.start) * 1000.0


CompletionHook = Callable[[RequestRecord], None]
RECORD = web.RequestKey("record", RequestRecord)


def request_id_for(request: web.Request) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex


def middleware(hooks: Sequence[CompletionHook], skip_paths: Collection[str]) -> Middleware:
    """Record every request except `skip_paths` (health probes) and report it to `hooks`."""

    @web.middleware
    async def record_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in skip_paths:
            return await handler(request)
        record = RequestRecord(
            request_id=request_id_for(request),
            method=request.method,
            path=request.path,
            client_addr=request.remote,
            started_at=datetime.now(UTC),
        )
        request[RECORD] = record
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            record.status = CLIENT_CLOSED
            record.error = record.error or "client closed the connection"
            raise
        except BaseException:
            record.status = 500  # errors.middleware runs inside this one, so this is a bug
            raise
        else:
            if record.status != CLIENT_CLOSED:
                record.status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = record.request_id
            return response
        finally:
            record.duration_ms = record.elapsed_ms()
            _dispatch(hooks, record)

    return record_requests


def _dispatch(hooks: Sequence[CompletionHook], record: RequestRecord) -> None:
    for hook in hooks:
        try:
            hook(record)
        except Exception:
            log.exception("completion hook %r failed for request %s", hook, record.request_id)
