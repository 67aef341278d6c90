"""A request's straight walk: route -> authentication -> admission -> backend -> outcome -> row.

`ledger` (a middleware) begins every API request's `Exchange` and, however the request ends,
answers its error in the route's dialect and hands its one row to the completion hooks. The
handler each route gets authenticates the caller, runs the admission step (place, body, quota,
rate) and lets the route's endpoint serve the request with a fair turn at a backend.

A batch endpoint (JSON-RPC) runs the same steps once per call of its batch: `_Calls` admits each
call alone and records it on a row of its own; the request itself then leaves no row, unless it
held no call at all (a parse error, an empty batch, a refused key).

Run the app with `handler_cancellation=True` (as `serve` and aiohttp's TestServer do): aiohttp
then cancels a handler whose client disconnected, and that is what closes the backend request and
stops llama_cpp.server generating for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.appkeys import (
    ADMISSION,
    AUTHENTICATOR,
    BACKENDS,
    COMPLETION_HOOKS,
    DECLARED_TOOLS,
    QUOTAS,
    SETTINGS,
    UPSTREAM_SESSION,
)
from proxy.auth.authenticator import presented_key
from proxy.dialects.openai import DIALECT as DEFAULT_DIALECT
from proxy.edge.paths import has_dot_segment
from proxy.errors import (
    AnswerBudgetSpent,
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    UpstreamUnreachable,
)
from proxy.limits.body import defer_continue
from proxy.limits.prompts import INFERENCE_PATHS, Ask
from proxy.pipeline.endpoint import (
    AdmittedCall,
    BatchEndpoint,
    CallerLimits,
    Context,
    Dialect,
    Prepared,
    Route,
)
from proxy.pipeline.exchange import Exchange
from proxy.upstream.affinity import of_call
from proxy.upstream.forward import Reply, UpstreamCall, forward

log = logging.getLogger(__name__)

EXCHANGE = web.RequestKey("exchange", Exchange)
PROBE_METHODS = frozenset({"GET", "HEAD"})


def add_routes(app: web.Application, routes: Sequence[Route]) -> dict[web.AbstractResource, Route]:
    """Register every route of the table under its path and aliases; return resource -> route."""
    table: dict[web.AbstractResource, Route] = {}
    for route in routes:
        handler = _handler_for(route)
        for path in (route.path, *route.aliases):
            # The 100 Continue a client may wait for is sent once its key is checked
            # (proxy.limits.body), not by aiohttp before anything is.
            registered = app.router.add_route(
                route.method, path, handler, expect_handler=defer_continue
            )
            table[registered.resource] = route  # type: ignore[index]
    return table


def add_fallback(app: web.Application, table: dict[web.AbstractResource, Route]) -> None:
    """Answer every path not in the table: 404, or 405 for a known path and another method.

    Registered last, as a route of its own, so that even these requests get the proxy's
    `Expect` handling (aiohttp would otherwise answer an unknown Expect with 417 before any
    middleware, leaving no row) and go through the ledger like any other.
    """

    async def unrouted(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in table:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
        if allowed:
            raise MethodNotAllowed(request.method, ", ".join(sorted(allowed)))
        raise NotFound(request.method, request.path)

    app.router.add_route("*", "/{tail:.*}", unrouted, expect_handler=defer_continue)


def ledger(table: dict[web.AbstractResource, Route], skip_paths: Collection[str]) -> Middleware:
    """One `Exchange` per API request, one error answer in its dialect, one row to the hooks."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in skip_paths and request.method in PROBE_METHODS:
            return await handler(request)  # a probe, not an API request
        route = table.get(request.match_info.route.resource)  # type: ignore[arg-type]
        settings = request.app[SETTINGS]
        exchange = Exchange.begin(
            request,
            route.path if route else request.path,
            client_timeout=float(settings.client_timeout_seconds),
            max_answer_bytes=settings.max_answer_bytes,
        )
        request[EXCHANGE] = exchange
        assert exchange.delivery is not None
        # A streamed answer's row is made as it ends, before its last bytes go out.
        exchange.delivery.on_complete = lambda: _finish(request, exchange)
        dialect = route.endpoint.dialect if route else _nearest_dialect(table, request.path)
        try:
            response = await _respond(request, handler, exchange, dialect)
            if not response.prepared:
                response.headers["X-Request-Id"] = exchange.answer_id
                if not request.content.is_eof():
                    # Answered before its body was read (refused, or the body stalled): the
                    # rest of the body is not waited for, so this connection cannot go on.
                    response.force_close()
                outcome = exchange.outcome
                if not outcome.complete:  # handed over whole: aiohttp writes it after we return
                    outcome.status, outcome.complete = response.status, True
            return response
        except asyncio.CancelledError:
            exchange.outcome.left()
            raise
        finally:
            if not exchange.calls:  # a batch's calls are its rows
                _finish(request, exchange)

    return record


def _nearest_dialect(table: dict[web.AbstractResource, Route], path: str) -> Dialect:
    """For a path no route has: the dialect of the route it lies under (so a mistyped path
    under /v1/messages is answered as Anthropic's API answers), else OpenAI's."""
    best: tuple[int, Dialect] = (0, DEFAULT_DIALECT)
    for route in table.values():
        for known in (route.path, *route.aliases):
            stem = known.split("{", 1)[0].rstrip("/")
            if len(stem) > best[0] and path.startswith(stem + "/"):
                best = (len(stem), route.endpoint.dialect)
    return best[1]


async def _respond(
    request: web.Request, handler: Handler, exchange: Exchange, dialect: Dialect
) -> web.StreamResponse:
    """The handler's answer, or the answer to what it raised, in the route's dialect."""
    try:
        if has_dot_segment(request.raw_path):
            raise InvalidRequest(
                "The path may not hold '.' or '..' segments, in any spelling; use the API's "
                "paths as they are."
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            raise _routing_error(request, exc) from None
    except ApiError as exc:
        return _answer(exchange, dialect, exc)
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _answer(exchange, dialect, InternalError())


def _routing_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return MethodNotAllowed(request.method, allowed)
    return NotFound(request.method, request.path)


def _answer(exchange: Exchange, dialect: Dialect, exc: ApiError) -> web.StreamResponse:
    outcome, delivery = exchange.outcome, exchange.delivery
    outcome.note_error(exc.reason)
    if delivery is not None and delivery.response is not None:
        # The answer had begun, so it can only be cut short: the client sees a cut.
        delivery.broke_off(exc.reason)
        return delivery.response
    return dialect.error(exc, exchange.answer_id)


def _finish(request: web.Request, exchange: Exchange) -> None:
    if exchange.recorded:
        return
    exchange.recorded = True
    row = exchange.row()
    for hook in request.app[COMPLETION_HOOKS]:
        try:
            hook(row)
        except Exception:
            log.exception("completion hook %r failed for request %s", hook, row.request_id)


def _handler_for(route: Route) -> Handler:
    endpoint = route.endpoint
    batch = isinstance(endpoint, BatchEndpoint)

    async def handle(request: web.Request) -> web.StreamResponse:
        """Authenticate, admit, and let the route's endpoint serve the request."""
        exchange = request[EXCHANGE]
        exchange.caller = await request.app[AUTHENTICATOR].authenticate(
            presented_key(request), exchange.client_addr
        )
        if batch:
            # Only the envelope here, under a place; each of its calls is admitted alone.
            async with _admitted(request, exchange, endpoint.check, True, spend=False) as checked:
                pass
            calls = _Calls(request, exchange)
            return await endpoint.serve(_context(request, exchange, calls), checked)
        async with _admitted(request, exchange, endpoint.check, endpoint.reads_body) as prepared:
            return await endpoint.serve(_context(request, exchange), prepared)

    return handle


@asynccontextmanager
async def _admitted(
    request: web.Request,
    exchange: Exchange,
    check: Callable[[bytes | None, CallerLimits], Prepared],
    read_body: bool,
    spend: bool = True,
) -> AsyncIterator[Prepared]:
    """The admission step for one request (or one call of a batch), held while entered."""
    admission = request.app[ADMISSION]
    caller, delivery = exchange.caller, exchange.delivery
    assert caller is not None
    assert delivery is not None
    limits = CallerLimits(
        admission.max_tokens(caller), caller.default_model, request.app[DECLARED_TOOLS]
    )

    def checked(raw: bytes | None) -> Prepared:
        prepared = check(raw, limits)
        exchange.model, exchange.stream = prepared.model, prepared.stream
        exchange.end_user = prepared.end_user
        if prepared.model is not None or prepared.ask is not None:
            _check_model(request, prepared.model)  # a request for no model spends nothing
        return prepared

    async with admission.admit(
        request,
        caller,
        exchange.outcome,
        checked,
        request_id=exchange.request_id,
        asks=lambda prepared: prepared.ask,
        read_body_first=read_body,
        spend=spend,
    ) as admitted:
        exchange.prompt_tokens = admitted.prompt_tokens
        exchange.answer_budget = admitted.answer
        delivery.headers.update(admitted.headers)
        yield admitted.checked


def _check_model(request: web.Request, model: str | None) -> None:
    """`ModelNotFound` (naming the models) when the backends say none of them serves `model`."""
    known = request.app[BACKENDS].models()
    if model is not None and known is not None and model not in known:
        raise ModelNotFound(model, ", ".join(known) or "none", known)


def _context(request: web.Request, exchange: Exchange, calls: _Calls | None = None) -> Context:
    assert exchange.caller is not None
    assert exchange.delivery is not None
    sender = _sender(request, exchange)
    return Context(
        exchange.caller,
        exchange.delivery,
        exchange.request_id,
        sender,
        calls,
        exchange.prompt_tokens,
        exchange.answer_left,
    )


class _Calls:
    """Admits, serves and records the calls of one batch request, each as a request of its own."""

    def __init__(self, request: web.Request, batch: Exchange) -> None:
        self._request = request
        self._batch = batch

    @asynccontextmanager
    async def admit(
        self, method: str, size: int, check: Callable[[CallerLimits], Prepared]
    ) -> AsyncIterator[AdmittedCall]:
        request, batch = self._request, self._batch
        call = batch.call(method)
        call.outcome.bytes_in = size
        assert call.delivery is not None
        assert batch.delivery is not None
        try:
            async with _admitted(request, call, lambda _, limits: check(limits), False) as prepared:
                batch.delivery.headers.update(call.delivery.headers)  # the latest call's limits
                yield AdmittedCall(prepared, _context(request, call))
        except ApiError as exc:
            call.outcome.note_error(exc.reason)
            call.outcome.status = exc.status
            raise
        except asyncio.CancelledError:
            call.outcome.left()
            raise
        except Exception:
            call.outcome.note_error(InternalError().reason)  # as any other request's row says
            call.outcome.status = 500
            raise
        finally:
            _finish(request, call)


async def _reserve_again(app: web.Application, exchange: Exchange, call: UpstreamCall) -> None:
    """A request asking the model once more: that prompt is measured and reserved too."""
    caller = exchange.caller
    assert caller is not None
    admission, quotas = app[ADMISSION], app[QUOTAS]
    if not quotas.applies(caller):
        return
    ask = Ask(call, 0, model=exchange.model)
    size = len(call.data or b"")
    measured = await admission.prompts.measure(ask, exchange.request_id, True, size)
    quotas.extend(caller, exchange.request_id, measured.prompt_tokens or 0)


def _sender(
    request: web.Request, exchange: Exchange
) -> Callable[[UpstreamCall, Reply], Awaitable[web.StreamResponse]]:
    """A fair turn at a backend for each call, retried elsewhere when a backend refuses it."""
    app = request.app
    assert exchange.caller is not None
    assert exchange.delivery is not None
    user, delivery = exchange.caller.user_id, exchange.delivery

    async def send(call: UpstreamCall, reply: Reply) -> web.StreamResponse:
        if exchange.sent and call.path in INFERENCE_PATHS:
            await _reserve_again(app, exchange, call)  # a tool loop asking the model again
        exchange.sent += 1
        left = exchange.answer_left()
        if left is not None and call.json is not None and "max_tokens" in call.json:
            if left < 1:
                raise AnswerBudgetSpent()
            call = call.answer_at_most(left)
        backends = app[BACKENDS]  # looked up per call: tests and schedulers may replace it
        # Each call's own conversation (a tool loop's grows call by call), whatever the API;
        # with one backend there is nowhere else to go, so nothing to work out.
        affinity = of_call(call.path, call.json) if len(backends.upstreams) > 1 else None
        refused: list[str] = []
        while True:
            async with backends.acquire(
                user, exchange.model, exchange.outcome, refused, affinity
            ) as upstream:
                try:
                    return await forward(
                        app[UPSTREAM_SESSION], upstream, call, reply, delivery, exchange.request_id
                    )
                except UpstreamUnreachable as exc:
                    # Nothing reached that backend, so another may take the request as it is.
                    backends.refused(upstream, exc.message)
                    refused.append(upstream.name)

    return send
