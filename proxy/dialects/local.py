"""The small REST API of local LLM servers: choose a model, pre-warm the prompt cache.

- `POST /setModel {"modelName": "name.gguf"}` (with or without `.gguf`; `null` goes back to the
  server's default) sets the caller's own default model, used by their requests that name none
  (any API); nobody else's. An unknown name is a 404 listing the models.
- `POST /restore_cache {"messages": [...], "tools": [...], "model": ...}` has the backend read
  that conversation (the prompt its next turn begins with) and generate one token, so the model
  holds it: its context does until another conversation comes, and its prompt cache, when on,
  for longer. The answer says how many tokens are now cached. It takes a fair turn like any
  request, counts against the rate limit, and its row has its prompt tokens.

Errors are `{"error": "<what to do>", "code": "...", ...}` with the HTTP status; `/stream`'s are
in `proxy.dialects.stream`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field, StrictStr

from proxy.appkeys import AUTHENTICATOR, DATABASE
from proxy.db import accounts
from proxy.db.connect import DatabaseUnavailable
from proxy.dialects import catalog
from proxy.dialects.collect import ChatAnswer
from proxy.dialects.conversation import Checked, WarmUp, chat_body
from proxy.dialects.openai_body import checked, parse_object
from proxy.dialects.wire import json_bytes
from proxy.errors import ApiError, KeyOutOfScope, ModelNotFound
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared
from proxy.upstream.forward import UpstreamCall


def error_body(exc: ApiError) -> dict[str, Any]:
    """The flat error shape of the local-server APIs."""
    body: dict[str, Any] = {"error": exc.message, "code": exc.code}
    if exc.param is not None:
        body["param"] = exc.param
    if isinstance(exc, ModelNotFound) and exc.models:
        body["models"] = exc.models
    retry = {name.lower(): value for name, value in exc.headers.items()}.get("retry-after")
    if retry is not None:
        body["retry_after"] = int(retry)
    return body


class LocalDialect:
    def error(self, exc: ApiError, request_id: str) -> web.Response:
        return web.json_response(error_body(exc), status=exc.status, headers=exc.headers)


DIALECT = LocalDialect()


class ChoiceNotStored(ApiError):
    status = 503
    code = "database_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "Your model choice could not be stored: the database is unavailable. Try again in "
            "a minute.",
            {"Retry-After": "5"},
        )


class ModelChoice(Checked):
    model_name: StrictStr | None = Field(alias="modelName")


class SetModel:
    """POST /setModel."""

    dialect = DIALECT
    reads_body = True
    prompt_param = None

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        choice = checked(ModelChoice, parse_object(raw))
        return Prepared(None, None, extra={"name": choice.model_name or None})

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        app = context.delivery.request.app
        name: str | None = prepared.extra["name"]
        chosen = None
        if name is not None:
            names = await catalog.model_names(context)
            chosen = catalog.match_model(name, names)
            if chosen is None:
                raise ModelNotFound(name, ", ".join(names) or "none", names)
            if not context.caller.may_use(chosen):  # it would become every key's default
                raise KeyOutOfScope.model(chosen, context.caller.models or ())
        user = context.caller.user_id
        try:
            stored = await app[DATABASE].run(
                lambda con: accounts.set_default_model(con, user, chosen)
            )
        except DatabaseUnavailable:
            raise ChoiceNotStored() from None
        if not stored:  # deleted meanwhile: the key no longer works either
            raise ChoiceNotStored()
        # This process at once; the others when the users trigger's notification reaches them.
        app[AUTHENTICATOR].invalidate(f"user:{user}")
        answer = {
            "modelName": chosen,
            "default": chosen or catalog.server_default(app),
            "message": (
                f"Requests of yours that name no model now use {chosen}."
                if chosen
                else "Requests of yours that name no model now use the server's default."
            ),
        }
        return context.delivery.whole(200, json_bytes(answer), "application/json")


class RestoreCache:
    """POST /restore_cache."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "messages"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        warm = checked(WarmUp, parse_object(raw))
        model = warm.model or limits.default_model
        tools = warm.tools if warm.tools is not None else limits.declared_tools
        # One token, greedy: the prompt is what matters. tool_choice "none" keeps any grammar
        # out of it; the prompt is the same whatever the choice.
        body = chat_body(
            warm.messages, tools, tool_choice="none", max_tokens=1, temperature=0, model=model
        )
        call = UpstreamCall("POST", "/v1/chat/completions", body)
        return Prepared(call, None, model, None, ask=Ask(call, 1, model=model))

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        answer = ChatAnswer()
        await context.send(prepared.call, answer)
        counted = context.delivery.outcome  # as its audit row has them
        result = {
            "cached_tokens": counted.prompt_tokens,  # the whole prefix is in the context now
            "reused_tokens": counted.cached_tokens,  # of which were there already (if known)
            "model": answer.document.get("model") or prepared.model,
        }
        return context.delivery.whole(200, json_bytes(result), "application/json")
