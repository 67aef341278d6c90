"""OpenAI's API: its endpoints on the pipeline, and its error shape.

Errors read `{"error": {"message", "type", "param", "code"}}`, so every OpenAI client library
reports them as the API's own.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.dialects import openai_body
from proxy.dialects.openai_body import parse_object
from proxy.dialects.openai_replies import (
    AssembledReply,
    BodyReply,
    OneModelReply,
    ScopedModelsReply,
    StreamReply,
)
from proxy.dialects.reasoning import Reasoning
from proxy.errors import ApiError, KeyOutOfScope
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared, Reply
from proxy.upstream.forward import UpstreamCall


class OpenAIDialect:
    def error(self, exc: ApiError, request_id: str) -> web.Response:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


DIALECT = OpenAIDialect()


def _with_default_model(payload: dict[str, Any], limits: CallerLimits) -> dict[str, Any]:
    """The caller's own default model (POST /setModel) for a request that names none."""
    if payload.get("model") is None and limits.default_model is not None:
        return {**payload, "model": limits.default_model}
    return payload


class _Forwarded:
    """An endpoint whose request goes to the backend as checked, its answer back as replied."""

    dialect = DIALECT
    reads_body = True
    prompt_param: str | None = None

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        assert prepared.reply is not None
        return await context.send(prepared.call, prepared.reply)


class Completions(_Forwarded):
    """POST /v1/chat/completions (`kind` chat) and /v1/completions (`kind` text).

    `reasoning` says what becomes of a chat answer's <think>...</think>.
    """

    def __init__(self, backend_path: str, kind: str, reasoning: Reasoning = Reasoning.KEEP) -> None:
        self._path = backend_path
        self._kind = kind
        self._reasoning = reasoning if kind == "chat" else Reasoning.KEEP
        self.prompt_param = "messages" if kind == "chat" else "prompt"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        normalize = openai_body.chat if self._kind == "chat" else openai_body.text
        request = normalize(_with_default_model(parse_object(raw), limits), limits.max_tokens)
        reply: Reply = (
            StreamReply(request.usage_wanted, self._reasoning)
            if request.stream
            else AssembledReply(self._kind, self._reasoning)
        )
        call = UpstreamCall("POST", self._path, request.body)
        ask = Ask(call, request.body["max_tokens"], request.strict, model=request.model)
        return Prepared(
            call, reply, request.model, request.stream, end_user=request.end_user, ask=ask
        )


class Embeddings(_Forwarded):
    """POST /v1/embeddings: the body as checked; tokens from the answer's usage."""

    prompt_param = "input"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        body = openai_body.embeddings(_with_default_model(parse_object(raw), limits))
        call = UpstreamCall("POST", "/v1/embeddings", body)
        reply = BodyReply(counts_tokens=True)
        model = body.get("model")
        ask = Ask(call, 0, model=model)
        return Prepared(call, reply, model, None, end_user=body.get("user"), ask=ask)


class Models(_Forwarded):
    """GET /v1/models: the backend's list, passed through."""

    reads_body = False

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        return Prepared(UpstreamCall("GET", "/v1/models"), BodyReply(counts_tokens=False))

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        if context.caller.models is not None:  # a key scoped to models lists only those
            return await context.send(prepared.call, ScopedModelsReply(context.caller))
        return await super().serve(context, prepared)


class ModelRetrieve(_Forwarded):
    """GET /v1/models/{model} (the OpenAI SDK's `models.retrieve`): one entry of the list.

    llama_cpp.server has no such route, so the proxy asks for the list and answers with the
    entry itself, or 404 `model_not_found` naming the models there are.
    """

    reads_body = False

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        return Prepared(UpstreamCall("GET", "/v1/models"), None)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        wanted = context.delivery.request.match_info["model"]
        if not context.caller.may_use(wanted):
            raise KeyOutOfScope.model(wanted, context.caller.models or ())
        return await context.send(prepared.call, OneModelReply(wanted))
