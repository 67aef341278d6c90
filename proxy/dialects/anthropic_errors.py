"""Errors in the Messages API's shape: `{"type": "error", "error": {"type", "message"},
"request_id"}`, with Anthropic's error types and its 529 for an overloaded model."""

from __future__ import annotations

from aiohttp import web

from proxy.dialects.wire import json_bytes
from proxy.errors import ApiError, ContextLengthExceeded

OVERLOADED = 529  # Anthropic's status for "overloaded": a queue timeout, or no backend up
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    417: "invalid_request_error",
    429: "rate_limit_error",
    OVERLOADED: "overloaded_error",
}
_KEY_HELP = (
    "Invalid API key. Send your llama-gate key in the x-api-key header (or as "
    "Authorization: Bearer); if it stopped working, ask your administrator for a new one."
)


def status_of(exc: ApiError) -> int:
    return OVERLOADED if exc.status in (503, 504) else exc.status


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def message_of(exc: ApiError) -> str:
    if isinstance(exc, ContextLengthExceeded):  # Anthropic's own words for it
        return f"prompt is too long: {exc.prompt_tokens} tokens > {exc.maximum} maximum"
    return _KEY_HELP if exc.code == "invalid_api_key" else exc.message


def error_event(exc: ApiError) -> bytes:
    """A failure after a stream began, as the stream's last event."""
    data = {
        "type": "error",
        "error": {"type": error_type(status_of(exc)), "message": message_of(exc)},
    }
    return b"event: error\ndata: " + json_bytes(data) + b"\n\n"


class AnthropicDialect:
    def error(self, exc: ApiError, request_id: str) -> web.Response:
        status = status_of(exc)
        body = {
            "type": "error",
            "error": {"type": error_type(status), "message": message_of(exc)},
            "request_id": request_id,
        }
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "www-authenticate"}
        return web.Response(
            body=json_bytes(body), status=status, headers=headers, content_type="application/json"
        )


DIALECT = AnthropicDialect()
