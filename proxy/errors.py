"""Errors in OpenAI's shape, so every client library reports them as the API's own.

Each `ApiError` knows its status, OpenAI `type` and `code`, and extra headers; `middleware`
turns them, aiohttp's own HTTP errors (404, 405, ...) and any unexpected failure into
`{"error": {"message", "type", "param", "code"}}` responses. Messages are sentences that say
what to do next and never contain a key, a DSN or a backend address.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.pipeline.records import RECORD

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    status = 500
    type = SERVER_ERROR
    code: str | None = None

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            error_body(self.message, self.type, self.code), status=self.status, headers=self.headers
        )


class InvalidApiKey(ApiError):
    """One answer for a missing, malformed, unknown, revoked or expired key or disabled user."""

    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__(
            "Invalid API key. Send your llama-gate key as `Authorization: Bearer <key>`; if it "
            "stopped working, ask your administrator for a new one.",
            {"WWW-Authenticate": "Bearer"},
        )


class KeyStoreUnavailable(ApiError):
    status = 503
    code = "key_store_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The key store is unavailable, so this API key cannot be checked right now. "
            "Try again in a minute.",
            {"Retry-After": "5"},
        )


def _retry_headers(retry_after_ms: int) -> dict[str, str]:
    return {
        "Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(retry_after_ms),
    }


class TooManyAuthFailures(ApiError):
    status = 429
    type = "requests"
    code = "too_many_authentication_failures"

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            "Too many requests with invalid API keys came from your address; try again in "
            f"{max(1, math.ceil(retry_after_ms / 1000))} s with a valid key.",
            _retry_headers(retry_after_ms),
        )


class RateLimited(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, limit: int, window_seconds: int, retry_after_ms: int,
                 headers: Mapping[str, str]) -> None:  # fmt: skip
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        super().__init__(
            f"Rate limit reached: at most {limit} requests per {window_seconds} s. "
            f"Try again in {seconds} s.",
            {**headers, **_retry_headers(retry_after_ms)},
        )


class TooManyConcurrent(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Concurrency limit reached: at most {limit} of your requests may be in flight or "
            "queued at once. Wait for one to finish, then try again.",
            _retry_headers(1000),
        )


class TokenQuotaExceeded(ApiError):
    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"

    def __init__(self, quota: str, used: int, limit: int, retry_after_ms: int,
                 headers: Mapping[str, str]) -> None:  # fmt: skip
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        super().__init__(
            f"Token quota reached: you used {used} of your {limit} tokens per {quota}. "
            f"Try again in {seconds} s, or ask your administrator for a larger quota.",
            {**headers, **_retry_headers(retry_after_ms)},
        )


class QueueTimeout(ApiError):
    status = 503
    code = "queue_timeout"

    def __init__(self, waited_seconds: float, retry_after_seconds: int) -> None:
        super().__init__(
            f"The model is busy: your request waited {waited_seconds:.0f} s for its turn. "
            f"Try again in {retry_after_seconds} s, or send fewer requests at once.",
            {"Retry-After": str(retry_after_seconds)},
        )


class BodyTooLarge(ApiError):
    status = 413
    type = INVALID_REQUEST
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than this server accepts ({limit} bytes); "
            "send a shorter prompt or fewer inputs."
        )


class InvalidJson(ApiError):
    status = 400
    type = INVALID_REQUEST
    code = "invalid_json"

    def __init__(self, detail: str) -> None:
        super().__init__(f"The request body is not valid JSON ({detail}); send a JSON object.")


class UpstreamError(ApiError):
    """The model server could not be used; `status` is 502, 503 or 504."""

    code = "model_server_unavailable"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, {"Retry-After": "5"} if status == 503 else None)
        self.status = status


class UpstreamUnreachable(UpstreamError):
    """The connection to the backend failed: nothing of the request reached it."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"Invalid URL ({request.method} {request.path}): the API lives under /v1/."
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed on {request.path}."
    elif exc.status == 413:
        message = "The request body is larger than this server accepts."
    else:
        message = exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
    type_ = INVALID_REQUEST if exc.status < 500 else SERVER_ERROR
    body = error_body(message, type_, None)
    return web.json_response(body, status=exc.status, headers=headers)


def _note(request: web.Request, error: str) -> None:
    """Give the request's record (if it has one) a short, safe description of the failure."""
    record = request.get(RECORD)
    if record is not None and record.error is None:
        record.error = error[:200]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error in OpenAI's shape; never let a traceback reach the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        _note(request, exc.code if exc.code and exc.status < 500 else f"{exc.code}: {exc}")
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        _note(request, f"HTTP {exc.status}")
        return _from_http_exception(request, exc)
    except Exception as exc:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        _note(request, f"internal error: {type(exc).__name__}")
        return ApiError(
            "The proxy failed unexpectedly; the error is logged. Try again, and tell your "
            "administrator if it keeps happening."
        ).response()
