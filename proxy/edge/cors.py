"""CORS for browser clients: preflights answered without a key, every answer labelled alike.

Allowed origins come from LLAMA_PROXY_CORS_ORIGINS (`*` by default, see `proxy.settings`). The
labels go on every response the proxy sends, its own 401/429/5xx included (a browser hides an
unlabelled error from the page, which then cannot say why), through `on_response_prepare`, which
runs for streams too. Nothing the backend says about CORS ever reaches a client: replies copy no
backend header but the content type. Credentials are never allowed: keys travel in headers.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

MAX_AGE_SECONDS = 600  # browsers cache a preflight this long
EXPOSED = ", ".join(
    (
        "X-Request-Id",
        "Retry-After",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
)
_MAX_REQUEST_HEADERS = 1024  # what a preflight may ask to send is echoed, within reason


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins) - {"*"}
        self._labels = {hdrs.ACCESS_CONTROL_EXPOSE_HEADERS: EXPOSED}  # decided once

    def allow(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin for `origin`, or None when it is not allowed."""
        if self._any:
            return "*"
        return origin if origin.lower() in self._origins else None

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer a browser's preflight itself: no key is asked for, no request is recorded."""
        if not _is_preflight(request):
            return await handler(request)
        origin = request.headers[hdrs.ORIGIN]
        allowed = self.allow(origin)
        if allowed is None:
            return web.json_response(
                {"error": {"message": f"Origin {origin[:100]!r} may not call this API.",
                           "type": "invalid_request_error", "param": None,
                           "code": "origin_not_allowed"}},
                status=403,
            )  # fmt: skip
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allowed,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
            hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_SECONDS),
            hdrs.VARY: "Origin",
        }
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        if asked and len(asked) <= _MAX_REQUEST_HEADERS:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked
        return web.Response(status=204, headers=headers)

    async def label(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: this proxy's CORS headers on an answer to a browser (the
        replies copy no backend header, so no other CORS header can be there)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or _is_preflight(request):
            return  # not a browser's; a preflight is answered by `preflight`, labels and all
        allowed = self.allow(origin)
        if allowed is not None:
            response.headers.update(self._labels)
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            response.headers.add(hdrs.VARY, "Origin")


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )
