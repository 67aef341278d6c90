"""OpenAI's Responses API on the pipeline: `POST /v1/responses`, `/v1/responses/input_tokens`,
and the stored responses (`GET` and `DELETE /v1/responses/{id}`, `GET .../input_items`).

What Codex speaks, and the `openai` SDK's `responses.*`. A request is translated into a chat
request (`proxy.dialects.responses_body`) and checked as one, so keys, limits, quotas, the fair
turn, the max_tokens cap and the audit row (path `/v1/responses`) are the pipeline's, as for every
route; the answer is rendered from the backend's one event stream
(`proxy.dialects.responses_replies`). Errors are OpenAI's JSON before a stream begins and a
`response.failed` event after. Responses are stored as `proxy.dialects.responses_store` says.

A request continuing a stored response (`previous_response_id`) passes the admission step on its
own input; the conversation it continues is then measured and its tokens reserved too, before
its turn (a 400 when it no longer fits the context, a 429 when it does not fit the quota).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.appkeys import ADMISSION, BACKENDS, QUOTAS
from proxy.dialects import openai_body
from proxy.dialects.openai import DIALECT
from proxy.dialects.openai_body import checked, parse_object
from proxy.dialects.responses_body import chat_payload, input_messages
from proxy.dialects.responses_replies import (
    Finished,
    ResponseReply,
    ResponseStreamReply,
    new_id,
    shell,
)
from proxy.dialects.responses_store import ResponseStore
from proxy.dialects.responses_types import InputTokensRequest, ResponsesRequest
from proxy.dialects.wire import json_bytes
from proxy.errors import InvalidRequest, UpstreamError
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared, Reply
from proxy.upstream.forward import UpstreamCall

CHAT = "/v1/chat/completions"


def _model(payload: dict[str, Any], limits: CallerLimits) -> dict[str, Any]:
    if payload.get("model") is None and limits.default_model is not None:
        return {**payload, "model": limits.default_model}
    return payload


def _call(
    request: ResponsesRequest | InputTokensRequest,
    limits: CallerLimits,
    history: list[dict[str, Any]] | None = None,
) -> tuple[UpstreamCall, openai_body.Inference]:
    inference = openai_body.chat(_model(chat_payload(request, history), limits), limits.max_tokens)
    return UpstreamCall("POST", CHAT, inference.body), inference


def input_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as the items `input_items` lists (each with an id)."""
    if isinstance(given, str):
        given = [{"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": given}]}]  # fmt: skip
    return [{"id": new_id("msg"), **item} if "id" not in item else item for item in given]


class Create:
    """POST /v1/responses."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "input"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(ResponsesRequest, parse_object(raw))
        call, inference = _call(request, limits)
        ask = Ask(call, inference.body["max_tokens"], inference.strict, model=inference.model)
        extra = {"request": request, "limits": limits, "model": inference.model or ""}
        return Prepared(call, None, inference.model, bool(request.stream), extra, request.user, ask)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        request: ResponsesRequest = prepared.extra["request"]
        store = ResponseStore.of(context.delivery.request.app)
        call = prepared.call
        user = context.caller.user_id
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            history = await store.conversation(user, request.previous_response_id)
            call, _ = _call(request, prepared.extra["limits"], history)
            await _charge_conversation(context, call, prepared.model)
        kept = store.enabled and request.store is not False
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
        # The model that serves it: the backends' default when the request names none.
        model = prepared.extra["model"] or context.delivery.request.app[BACKENDS].default_model()
        made = {**shell(request, model or "", tools, request.max_output_tokens),
                "store": kept}  # fmt: skip

        async def finished(response: dict[str, Any]) -> None:
            if not kept:
                return
            messages = input_messages(request.input) + input_messages(response["output"])
            await store.keep(user, response, input_items(request.input), messages)

        reply: Reply = _reply(request, made, finished)
        return await context.send(call, reply)


async def _charge_conversation(context: Context, call: UpstreamCall, model: str | None) -> None:
    """The continued conversation, measured (a 400 if it no longer fits the context) and its
    tokens reserved on top of what the admission step reserved for the new input alone (a 429
    if they do not fit the user's quota), before the request's turn."""
    app = context.delivery.request.app
    ask = Ask(call, 0, model=model)
    size = len(call.data or b"")
    measured = await app[ADMISSION].prompts.measure(ask, context.request_id, True, size)
    more = (measured.prompt_tokens or 0) - (context.prompt_tokens or 0)
    if more > 0:
        weight = app[ADMISSION].budgets.weight_of(model)
        app[QUOTAS].extend(context.caller, context.request_id, more, weight)
        await app[ADMISSION].budgets.extend(context.caller, context.request_id, more, weight)


def _reply(request: ResponsesRequest, made: dict[str, Any], finished: Finished) -> Reply:
    if request.stream:
        return ResponseStreamReply(made, finished)
    return ResponseReply(made, finished)


class InputTokens:
    """POST /v1/responses/input_tokens: the prompt tokens the backend will see for the request,
    counted as its measure step counts them (no fair turn, nothing charged)."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "input"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(InputTokensRequest, parse_object(raw))
        call, inference = _call(request, limits)
        ask = Ask(call, 0, charged=False, model=inference.model)
        extra = {"request": request, "limits": limits}
        return Prepared(None, None, inference.model, None, extra, ask=ask)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        tokens = context.prompt_tokens
        request: InputTokensRequest = prepared.extra["request"]
        if request.previous_response_id is not None:  # counted with the conversation it continues
            app = context.delivery.request.app
            user = context.caller.user_id
            history = await ResponseStore.of(app).conversation(user, request.previous_response_id)
            call, inference = _call(request, prepared.extra["limits"], history)
            ask = Ask(call, 0, charged=False, model=inference.model)
            size = len(call.data or b"")
            measured = await app[ADMISSION].prompts.measure(ask, context.request_id, True, size)
            tokens = measured.prompt_tokens
        if tokens is None:
            raise UpstreamError(502, "The model server cannot count tokens (is it llama-gate's?).")
        body = json_bytes({"object": "response.input_tokens", "input_tokens": tokens})
        return context.delivery.whole(200, body, "application/json")


class _Stored:
    """A route on one stored response: `GET`, `DELETE /v1/responses/{id}`, `.../input_items`."""

    dialect = DIALECT
    reads_body = False
    prompt_param: str | None = None

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        return Prepared(None, None)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        request = context.delivery.request
        store = ResponseStore.of(request.app)
        answer = await self.answer(store, context.caller.user_id, request.match_info["id"], request)
        return context.delivery.whole(200, json_bytes(answer), "application/json")

    async def answer(
        self, store: ResponseStore, user: int, response_id: str, request: web.Request
    ) -> dict[str, Any]:
        raise NotImplementedError


class Retrieve(_Stored):
    async def answer(
        self, store: ResponseStore, user: int, response_id: str, request: web.Request
    ) -> dict[str, Any]:
        response, _ = await store.read(user, response_id)
        return response


class Delete(_Stored):
    async def answer(
        self, store: ResponseStore, user: int, response_id: str, request: web.Request
    ) -> dict[str, Any]:
        await store.delete(user, response_id)
        return {"id": response_id, "object": "response", "deleted": True}


class InputItems(_Stored):
    """Newest first unless `?order=asc`, as OpenAI's API lists them (all in one page)."""

    async def answer(
        self, store: ResponseStore, user: int, response_id: str, request: web.Request
    ) -> dict[str, Any]:
        _, items = await store.read(user, response_id)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' must be 'asc' or 'desc'.", "order")
        if order == "desc":
            items.reverse()
        return {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
