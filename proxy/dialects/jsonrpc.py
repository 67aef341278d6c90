"""JSON-RPC 2.0 at POST /rpc: the envelope exactly as the specification has it, and each call
through the pipeline alone.

- `"jsonrpc": "2.0"` is required; an `id` (string, number or null) is echoed; a request without
  one is a notification and gets no response; a batch (an array) gets an array of responses, in
  its order, without the notifications'; one holding only notifications, and a lone notification,
  get HTTP 204 and no body. An empty batch is one -32600 error.
- -32700 parse error (id null), -32600 invalid request, -32601 unknown method, -32602 invalid
  params (`error.data.param` names the parameter), -32603 internal error; the server's own errors
  are -32000..-32099 (`SERVER_ERRORS`), with what a client needs in `error.data`: `retry_after`
  (seconds) when trying again later will do, `models` for an unknown model, and the error's HTTP
  `status` and `code` as the OpenAI API would give them.
- Every JSON-RPC response is HTTP 200. What fails before JSON-RPC begins keeps its HTTP status
  with a JSON-RPC error body (id null): a missing or bad key is 401, a body over the size cap 413.
- Each call, notifications included, is admitted alone (its place, token quota and rate limit),
  served alone (a fair turn at a backend for each backend request) and recorded on its own audit
  row: path `/rpc`, method the RPC method. Calls of a batch run one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.dialects import catalog, toolloop
from proxy.dialects.conversation import CreateMessage
from proxy.dialects.openai_body import (
    checked,
    parse_json,
    refuse_lone_surrogates,
)
from proxy.dialects.wire import json_bytes
from proxy.errors import (
    INVALID_REQUEST,
    AnswerTooLarge,
    ApiError,
    InternalError,
    InvalidApiKey,
    InvalidJson,
    InvalidRequest,
    KeyOutOfScope,
    KeyStoreUnavailable,
    ModelNotFound,
    QueueTimeout,
    RateLimited,
    TokenQuotaExceeded,
    TooManyAuthFailures,
    TooManyConcurrent,
    UpstreamError,
)
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import AdmittedCall, BatchEndpoint, CallerLimits, Context, Prepared

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_RPC_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The server's own errors, each with what a client needs to know in error.data.
RATE_LIMITED = -32000  # too many requests, or too many at once: data.retry_after
QUOTA_EXCEEDED = -32001  # the token quota: data.retry_after
QUEUE_TIMEOUT = -32002  # waited too long for the model: data.retry_after
BACKEND_UNAVAILABLE = -32003  # the model server is unreachable or failed: data.retry_after
UNKNOWN_MODEL = -32004  # data.models
UNAUTHORIZED = -32005  # missing or bad key (HTTP 401)
KEY_STORE_UNAVAILABLE = -32006  # the key cannot be checked now: data.retry_after
ANSWER_TOO_LARGE = -32007
FORBIDDEN = -32008  # the key's scope leaves out this API or model (HTTP 403)
SERVER_ERRORS: tuple[tuple[type[ApiError], int], ...] = (
    (RateLimited, RATE_LIMITED),
    (TooManyConcurrent, RATE_LIMITED),
    (TooManyAuthFailures, RATE_LIMITED),
    (TokenQuotaExceeded, QUOTA_EXCEEDED),
    (QueueTimeout, QUEUE_TIMEOUT),
    (ModelNotFound, UNKNOWN_MODEL),
    (InvalidApiKey, UNAUTHORIZED),
    (KeyOutOfScope, FORBIDDEN),
    (KeyStoreUnavailable, KEY_STORE_UNAVAILABLE),
    (AnswerTooLarge, ANSWER_TOO_LARGE),
    (UpstreamError, BACKEND_UNAVAILABLE),
)
MAX_BATCH = 100  # calls in one batch: each is admitted alone, so a batch is no way past limits


class InvalidRpcRequest(ApiError):
    """The JSON sent is not a valid JSON-RPC request object (or batch)."""

    status = 400
    type = INVALID_REQUEST
    code = "invalid_request"


class MethodNotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    code = "method_not_found"


def error_object(exc: ApiError, in_call: bool) -> dict[str, Any]:
    """JSON-RPC's error object for `exc`; `in_call`: raised by a call, not by the envelope."""
    data: dict[str, Any] = {"status": exc.status, "code": exc.code}
    if exc.param is not None:
        data["param"] = exc.param
    headers = {name.lower(): value for name, value in exc.headers.items()}
    if "retry-after" in headers:
        data["retry_after"] = int(headers["retry-after"])
    if "retry-after-ms" in headers:
        data["retry_after_ms"] = int(headers["retry-after-ms"])
    if isinstance(exc, ModelNotFound) and exc.models:
        data["models"] = exc.models
    return {"code": _code(exc, in_call), "message": exc.message, "data": data}


def _code(exc: ApiError, in_call: bool) -> int:
    if isinstance(exc, InvalidJson):
        return PARSE_ERROR
    if isinstance(exc, InvalidRpcRequest):
        return INVALID_RPC_REQUEST
    if isinstance(exc, MethodNotFound):
        return METHOD_NOT_FOUND
    if isinstance(exc, InvalidRequest):
        return INVALID_PARAMS if in_call else INVALID_RPC_REQUEST
    for kind, code in SERVER_ERRORS:
        if isinstance(exc, kind):
            return code
    if 400 <= exc.status < 500:  # the HTTP request itself (its size, its timing, its path)
        return INVALID_RPC_REQUEST
    return INTERNAL_ERROR


class JsonRpcDialect:
    def error(self, exc: ApiError, request_id: str) -> web.Response:
        # JSON-RPC's own errors are answers like any other (200); the HTTP request's keep theirs.
        rpc = isinstance(exc, InvalidJson | InvalidRpcRequest)
        body = {"jsonrpc": "2.0", "error": error_object(exc, in_call=False), "id": None}
        return web.json_response(body, status=200 if rpc else exc.status, headers=exc.headers)


DIALECT = JsonRpcDialect()


@dataclass(frozen=True)
class _Method:
    check: Callable[[Context, dict[str, Any], CallerLimits], Prepared]
    run: Callable[[AdmittedCall], Awaitable[Any]]


class JsonRpc(BatchEndpoint):
    """POST /rpc."""

    dialect = DIALECT

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        payload, surrogates = parse_json(raw)
        batch = isinstance(payload, list)
        if batch and not payload:
            raise InvalidRpcRequest("The batch is empty: send at least one request object.")
        if batch and len(payload) > MAX_BATCH:
            raise InvalidRpcRequest(f"A batch may hold at most {MAX_BATCH} requests.")
        items = payload if batch else [payload]
        # Where a lone surrogate might be, each call's params are looked through for one.
        return Prepared(None, None, extra={"batch": batch, "items": items, "text": surrogates})

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        answers = []
        for item in prepared.extra["items"]:
            answer = await self._one(context, item, prepared.extra["text"])
            if answer is not None:
                answers.append(answer)
        delivery = context.delivery
        if not answers:  # notifications only
            return delivery.whole(204, b"", "application/json")
        document = answers if prepared.extra["batch"] else answers[0]
        return delivery.whole(200, json_bytes(document), "application/json")

    async def _one(self, context: Context, item: Any, text: bool) -> dict[str, Any] | None:
        """The response to one request object; None for a notification."""
        request_id = item.get("id") if isinstance(item, dict) else None
        if not _valid_id(request_id):
            request_id = None
        try:
            method, params = _request(item)
        except InvalidRpcRequest as exc:
            context.delivery.outcome.note_error(exc.reason)  # the batch's row, if it has no call
            return _error(exc, request_id, in_call=False)
        notification = "id" not in item
        size = len(json_bytes(item))
        calls = context.calls
        assert calls is not None
        try:
            async with calls.call(
                method, size, lambda limits: _check(context, method, params, limits, text)
            ) as call:
                result = await METHODS[method].run(call)
                answer = {"jsonrpc": "2.0", "result": result, "id": request_id}
                call.answered(0 if notification else len(json_bytes(answer)))
        except ApiError as exc:
            answer = _error(exc, request_id, in_call=True)
        except Exception:
            log.exception("JSON-RPC method %s failed", method)
            answer = _error(InternalError(), request_id, in_call=True)
        return None if notification else answer


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _request(item: Any) -> tuple[str, Any]:
    """The method and params of a valid request object, or `InvalidRpcRequest` saying why not."""
    if not isinstance(item, dict):
        raise InvalidRpcRequest(f"A request must be a JSON object, not {_kind(item)}.")
    if item.get("jsonrpc") != "2.0":
        raise InvalidRpcRequest('A request must have "jsonrpc": "2.0".')
    if "id" in item and not _valid_id(item["id"]):
        raise InvalidRpcRequest("A request's id must be a string, a number or null.")
    method = item.get("method")
    if not isinstance(method, str):
        raise InvalidRpcRequest('A request must have a "method" string.')
    params = item.get("params", {})
    if not isinstance(params, dict | list):
        raise InvalidRpcRequest('"params" must be an object (or an array), if given.')
    return method, params


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _error(exc: ApiError, request_id: Any, in_call: bool) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error_object(exc, in_call), "id": request_id}


def _check(
    context: Context, method: str, params: Any, limits: CallerLimits, text: bool
) -> Prepared:
    """The call's check, at the admission step: a refusal here spends nothing. `text`: the
    body may hold a lone surrogate somewhere."""
    if text:
        refuse_lone_surrogates(params, "params")
    known = METHODS.get(method)
    if known is None:
        shown = method if len(method) <= 64 else method[:61] + "..."
        raise MethodNotFound(
            f"The method {shown!r} does not exist; the methods are: {', '.join(sorted(METHODS))}."
        )
    return known.check(context, params, limits)


def _named(params: Any) -> dict[str, Any]:
    if isinstance(params, list):
        if params:
            raise InvalidRequest("'params' must be an object of named parameters.", "params")
        return {}
    return params  # type: ignore[no-any-return]


# -- the methods --------------------------------------------------------------------------------


def _check_create_message(context: Context, params: Any, limits: CallerLimits) -> Prepared:
    app = context.delivery.request.app
    turn = toolloop.begin(
        checked(CreateMessage, _named(params)),
        declared=catalog.declared_tools(app),
        max_tokens=limits.max_tokens,
        iteration_cap=catalog.iteration_cap(app),
        default_model=limits.default_model,
    )
    catalog.check_model(app, turn.model)
    ask = Ask(turn.request(final=turn.last), turn.max_tokens, turn.strict, model=turn.model)
    return Prepared(None, None, turn.model, False, {"turn": turn}, ask=ask)


async def _create_message(call: AdmittedCall) -> Any:
    return await toolloop.create_message(call.context, call.prepared.extra["turn"])


def _check_nothing(context: Context, params: Any, limits: CallerLimits) -> Prepared:
    if _named(params):
        name = next(iter(_named(params)))
        raise InvalidRequest(f"Unknown parameter '{name}': this method takes none.", name)
    return Prepared(None, None, extra={"default": limits.default_model})


async def _tool_list(call: AdmittedCall) -> Any:
    tools = catalog.declared_tools(call.context.delivery.request.app)
    return {"tools": [tool.model_dump(exclude_none=True) for tool in tools]}


async def _list_models(call: AdmittedCall) -> Any:
    app = call.context.delivery.request.app
    yours = call.prepared.extra["default"]
    return {
        "models": await catalog.model_names(call.context),
        "default": yours or catalog.server_default(app),
        "your_default": yours,
    }


METHODS: dict[str, _Method] = {
    "create_message": _Method(_check_create_message, _create_message),
    "tool_list": _Method(_check_nothing, _tool_list),
    "list_models": _Method(_check_nothing, _list_models),
}
