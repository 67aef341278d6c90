"""A request's straight walk, step by step, in the order the steps run:

1. `ledger` (a middleware) begins the request's `Exchange`, and however it ends, answers its
   error in the route's dialect and hands its one row to the completion hooks;
2. `Walk.authenticate`: the caller, from the key (`proxy.auth`);
3. `Walk.admit`: the admission step (`proxy.limits.admission`: place, body, prompt, quota, rate);
4. the route's endpoint serves it (`proxy.dialects`), asking the model through `Walk.send`:
   the answer's budget, a fair turn at a backend (`proxy.upstream.backends`), the call
   (`proxy.upstream.forward`), and the answer rendered from its one event stream by the
   endpoint's reply (`proxy.upstream.events`).

A batch endpoint (JSON-RPC) runs steps 3 and 4 once per call of its batch (`Walk.call`): each
call is admitted alone and recorded on a row of its own; the request itself then leaves no row,
unless it held no call at all (a parse error, an empty batch, a refused key).

Run the app with `handler_cancellation=True` (as `serve` and aiohttp's TestServer do): aiohttp
then cancels a handler whose client disconnected, and that is what closes the backend request and
stops llama_cpp.server generating for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
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
from proxy.auth.cache import Principal
from proxy.edge.paths import has_dot_segment
from proxy.errors import (
    AnswerBudgetSpent,
    AnswerTooLarge,
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    UpstreamBrokeOff,
    UpstreamUnreachable,
)
from proxy.limits.body import defer_continue
from proxy.limits.prompts import INFERENCE_PATHS, Ask
from proxy.pipeline import scope
from proxy.pipeline.delivery import ClientGone, Delivery
from proxy.pipeline.endpoint import (
    AdmittedCall,
    BatchEndpoint,
    CallerLimits,
    Context,
    Dialect,
    Prepared,
    Reply,
    Route,
)
from proxy.pipeline.exchange import Exchange
from proxy.upstream.affinity import of_call
from proxy.upstream.events import AnswerTooLong, BackendAnswer, BackendBrokeOff
from proxy.upstream.forward import Sender, UpstreamCall, forward

log = logging.getLogger(__name__)

EXCHANGE = web.RequestKey("exchange", Exchange)
PROBE_METHODS = frozenset({"GET", "HEAD"})


def add_routes(app: web.Application, routes: Sequence[Route]) -> dict[web.AbstractResource, Route]:
    """Register every route of the table under its path and aliases; return resource -> route."""
    table: dict[web.AbstractResource, Route] = {}
    for route in routes:
        handler = Walk(route).handle
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
    middleware, leaving no record) and go through the ledger like any other.
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


def ledger(
    table: dict[web.AbstractResource, Route], skip_paths: Collection[str], default: Dialect
) -> Middleware:
    """One `Exchange` per API request, one error answer in its dialect, one row to the hooks;
    `default` answers a path no route has (unless it lies under one: then that route's)."""
    stems = sorted(
        (
            (known.split("{", 1)[0].rstrip("/") + "/", route.endpoint.dialect)
            for route in table.values()
            for known in (route.path, *route.aliases)
        ),
        key=lambda stem: -len(stem[0]),
    )

    def nearest(path: str) -> Dialect:
        return next((dialect for stem, dialect in stems if path.startswith(stem)), default)

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
        exchange.asks_model = route is not None and route.endpoint.prompt_param is not None
        assert exchange.delivery is not None
        # A streamed answer's row is made as it ends, before its last bytes go out.
        exchange.delivery.on_complete = lambda: _finish(request, exchange)
        dialect = route.endpoint.dialect if route else nearest(request.path)
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
            # The request and its exchange refer to each other (and the hook to both): let
            # them go by their reference counts as the request ends, not by the garbage
            # collector's next round, which would have to walk them all first.
            del request[EXCHANGE]
            exchange.delivery.on_complete = None

    return record


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
    if exchange.model is None and exchange.asks_model:
        # Refused before its body said which model: the one that would have served it, when
        # there is only one (looked up here, for such refusals only, not on every request).
        only = request.app[BACKENDS].models()
        exchange.model = only[0] if only is not None and len(only) == 1 else None
    row = exchange.row()
    for hook in request.app[COMPLETION_HOOKS]:
        try:
            hook(row)
        except Exception:
            log.exception("completion hook %r failed for request %s", hook, row.request_id)


class Walk:
    """The steps of a request to one route, in order."""

    def __init__(self, route: Route) -> None:
        self._endpoint = route.endpoint
        self._batch = isinstance(route.endpoint, BatchEndpoint)
        self._api = route.api

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, admit, and let the route's endpoint serve the request."""
        exchange = request[EXCHANGE]
        await self.authenticate(request, exchange)
        endpoint = self._endpoint
        if self._batch:
            # Only the envelope here, under a place; each of its calls is admitted alone.
            async with self.admit(request, exchange, endpoint.check, spend=False) as envelope:
                pass
            return await endpoint.serve(self.context(request, exchange, calls=True), envelope)
        async with self.admit(request, exchange, endpoint.check) as prepared:
            return await endpoint.serve(self.context(request, exchange), prepared)

    async def authenticate(self, request: web.Request, exchange: Exchange) -> None:
        """Who is asking, and may their key use this API at all (a 403 spends nothing)."""
        caller = await request.app[AUTHENTICATOR].authenticate(
            presented_key(request), exchange.client_addr
        )
        exchange.caller = caller
        scope.refuse_other_apis(caller, self._api)

    @asynccontextmanager
    async def admit(
        self,
        request: web.Request,
        exchange: Exchange,
        check: Callable[[bytes | None, CallerLimits], Prepared],
        read_body: bool | None = None,
        spend: bool = True,
    ) -> AsyncIterator[Prepared]:
        """The admission step for one request (or one call of a batch), held while entered."""
        app = request.app
        admission = app[ADMISSION]
        caller, delivery, outcome = exchange.caller, exchange.delivery, exchange.outcome
        assert caller is not None
        assert delivery is not None
        cap = admission.max_tokens(caller)
        limits = CallerLimits(cap, caller.default_model, app[DECLARED_TOOLS])

        def checked(raw: bytes | None) -> Prepared:
            prepared = check(raw, limits)
            exchange.model, exchange.stream = prepared.model, prepared.stream
            if prepared.model is None and prepared.ask is not None:
                exchange.model = app[BACKENDS].default_model()  # what serves it: on its row too
            exchange.end_user = prepared.end_user
            if prepared.model is not None:
                _known_model(request, caller, prepared.model)  # spends nothing
            if caller.models is not None and prepared.ask is not None:
                prepared = scope.model_call(
                    app[BACKENDS].models(), caller, exchange.model, prepared
                )
            return prepared

        def received(size: int) -> None:
            outcome.bytes_in += size

        endpoint = self._endpoint
        async with admission.hold(
            request,
            caller,
            received,
            checked,
            request_id=exchange.request_id,
            asks=lambda prepared: prepared.ask,
            read_body_first=endpoint.reads_body if read_body is None else read_body,
            spend=spend,
            prompt_param=endpoint.prompt_param if spend else None,
        ) as admitted:
            exchange.prompt_tokens = admitted.prompt_tokens
            exchange.answer_budget = admitted.answer
            exchange.weight = admitted.weight
            delivery.headers.update(admitted.headers)
            yield admitted.checked

    def context(self, request: web.Request, exchange: Exchange, calls: bool = False) -> Context:
        assert exchange.caller is not None
        assert exchange.delivery is not None
        return Context(
            exchange.caller,
            exchange.delivery,
            exchange.request_id,
            lambda call, reply: self.send(request, exchange, call, reply),
            _Calls(self, request, exchange) if calls else None,
            exchange.prompt_tokens,
            exchange.answer_left,
        )

    async def send(
        self, request: web.Request, exchange: Exchange, call: UpstreamCall, reply: Reply
    ) -> web.StreamResponse:
        """Ask a backend, after a fair turn at one, and render its answer with `reply`; a call
        whose connection a backend refused is retried elsewhere (nothing of it reached one)."""
        app = request.app
        caller, delivery, outcome = exchange.caller, exchange.delivery, exchange.outcome
        assert caller is not None
        assert delivery is not None
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
        # a large body's serialization, at its turn (kept for each attempt)
        await app[ADMISSION].lane.step(outcome.bytes_in, lambda: call.data)
        sender = Sender(exchange.request_id, exchange.client_addr)
        session, limit = app[UPSTREAM_SESSION], delivery.max_answer_bytes
        refused: list[str] = []
        cap = app[ADMISSION].max_concurrent(caller)
        budgets = app[ADMISSION].budgets
        team, groups = budgets.team_of(caller), budgets.group_caps(caller)
        while True:
            async with backends.acquire(
                caller.user_id, exchange.model, outcome, refused, affinity, cap, team, groups
            ) as upstream:
                try:
                    async with forward(
                        session, upstream, call, sender, outcome, delivery.first_byte, limit
                    ) as answer:
                        return await _rendered(reply, answer, delivery, exchange.request_id)
                except UpstreamUnreachable as exc:
                    backends.refused(upstream, exc.message)
                    refused.append(upstream.name)


async def _rendered(
    reply: Reply, answer: BackendAnswer, delivery: Delivery, request_id: str
) -> web.StreamResponse:
    """`reply`'s rendering of the answer; a backend that broke off is a 502, or a cut when
    the client's answer had begun."""
    try:
        return await reply.relay(answer, delivery)
    except BackendBrokeOff as exc:
        log.warning("request %s: %s", request_id, exc)
        if delivery.response is None:
            raise UpstreamBrokeOff(str(exc)) from None
        delivery.broke_off(str(exc))
        return delivery.response
    except AnswerTooLong:
        raise AnswerTooLarge(delivery.max_answer_bytes) from None
    except ClientGone:
        assert delivery.response is not None
        return delivery.response


async def _reserve_again(app: web.Application, exchange: Exchange, call: UpstreamCall) -> None:
    """A request asking the model once more: that prompt is measured and reserved too."""
    caller = exchange.caller
    assert caller is not None
    admission, quotas = app[ADMISSION], app[QUOTAS]
    if not (quotas.applies(caller) or admission.budgets.applies(caller)):
        return
    ask = Ask(call, 0, model=exchange.model)
    size = len(call.data or b"")
    measured = await admission.prompts.measure(ask, exchange.request_id, True, size)
    tokens, weight = measured.prompt_tokens or 0, exchange.weight or 1.0
    quotas.extend(caller, exchange.request_id, tokens, weight)
    await admission.budgets.extend(caller, exchange.request_id, tokens, weight)


def _known_model(request: web.Request, caller: Principal, model: str) -> None:
    """`ModelNotFound` (naming the models the caller's key may use) when the backends say none
    of them serves `model`."""
    known = request.app[BACKENDS].models()
    if known is not None and model not in known:
        usable = [name for name in known if caller.may_use(name)]
        raise ModelNotFound(model, ", ".join(usable) or "none", usable)


class _Calls:
    """Admits, serves and records the calls of one batch request, each as a request of its own."""

    def __init__(self, walk: Walk, request: web.Request, batch: Exchange) -> None:
        self._walk = walk
        self._request = request
        self._batch = batch

    @asynccontextmanager
    async def call(
        self, method: str, size: int, check: Callable[[CallerLimits], Prepared]
    ) -> AsyncIterator[AdmittedCall]:
        request, batch, walk = self._request, self._batch, self._walk
        call = batch.call(method)
        call.outcome.bytes_in = size
        assert call.delivery is not None
        assert batch.delivery is not None
        try:
            async with walk.admit(
                request, call, lambda _, limits: check(limits), read_body=False
            ) as prepared:
                batch.delivery.headers.update(call.delivery.headers)  # the latest call's limits
                yield AdmittedCall(prepared, walk.context(request, call))
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
