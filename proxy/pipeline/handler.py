"""The API routes: every request is authenticated, checked, admitted, queued, then forwarded.

Everything under /v1/ goes to the backend, plus the unprefixed paths older clients call.
"""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import (
    AUTHENTICATOR,
    BACKENDS,
    QUOTAS,
    RATE_LIMITER,
    SETTINGS,
    UPSTREAM_SESSION,
)
from proxy.auth.authenticator import presented_key
from proxy.errors import UpstreamUnreachable
from proxy.pipeline.records import RECORD
from proxy.upstream.body import prepare_body
from proxy.upstream.forward import forward

ALIASES = ("/chat/completions", "/completions", "/embeddings", "/models", "/models/{model:.+}")


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/v1/{tail:.+}", handle)
    for alias in ALIASES:
        app.router.add_route("*", alias, handle)


def upstream_path(request: web.Request) -> str:
    """The decoded path, under /v1/: what the proxy inspects is exactly what the backend serves.

    Classifying the raw path would let `/v1/%63hat/completions` (which the backend decodes to
    chat completions) past the body checks, the max_tokens cap and token counting.
    """
    path = request.path
    return path if path.startswith("/v1/") else "/v1" + path


async def handle(request: web.Request) -> web.StreamResponse:
    """Authenticate, admit and stream one API request to a backend and back, fairly queued."""
    app = request.app
    record = request[RECORD]
    principal = await app[AUTHENTICATOR].authenticate(presented_key(request), request.remote)
    record.user_id, record.username = principal.user_id, principal.username
    record.key_id = principal.key_id
    path = upstream_path(request)
    # The body is checked before rate limiting, so a malformed request spends no quota.
    settings = app[SETTINGS]
    max_tokens = principal.max_tokens or settings.max_tokens_hard_cap
    body = await prepare_body(request, path, record, settings.max_body_bytes, max_tokens)
    # The cheap local refusals first: a request refused for them spends no rate limit.
    app[BACKENDS].check_room(record, principal.max_concurrent)
    token_headers = await app[QUOTAS].admit(principal)
    limit_headers = await app[RATE_LIMITER].admit(principal)
    headers = {**limit_headers, **token_headers}
    refused: list[str] = []
    while True:
        async with app[BACKENDS].acquire(record, principal.max_concurrent, refused) as upstream:
            try:
                return await forward(
                    request, app[UPSTREAM_SESSION], upstream, path, body, record, headers
                )
            except UpstreamUnreachable as exc:
                # Nothing reached that backend, so another may take the request as it is.
                app[BACKENDS].refused(upstream, exc.message)
                refused.append(upstream.name)
