"""OpenAI's Responses API on the pipeline: `POST /v1/responses` and `/v1/responses/input_tokens`.

What Codex speaks, and the `openai` SDK's `responses.create`. A request is translated into a chat
request (`proxy.dialects.responses_body`) and checked as one, so keys, limits, quotas, the fair
turn, the max_tokens cap and the audit row (path `/v1/responses`) are the pipeline's, as for every
route; the answer is rendered from the backend's one event stream
(`proxy.dialects.responses_replies`). Errors are OpenAI's JSON before a stream begins and a
`response.failed` event after.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.dialects import openai_body
from proxy.dialects.openai import DIALECT
from proxy.dialects.openai_body import checked, parse_object
from proxy.dialects.responses_body import chat_payload
from proxy.dialects.responses_replies import ResponseReply, ResponseStreamReply, shell
from proxy.dialects.responses_types import InputTokensRequest, ResponsesRequest
from proxy.dialects.wire import json_bytes
from proxy.errors import UpstreamError
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared, Reply
from proxy.upstream.forward import UpstreamCall

CHAT = "/v1/chat/completions"


def _model(payload: dict[str, Any], limits: CallerLimits) -> dict[str, Any]:
    if payload.get("model") is None and limits.default_model is not None:
        return {**payload, "model": limits.default_model}
    return payload


class Create:
    """POST /v1/responses."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "input"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(ResponsesRequest, parse_object(raw))
        inference = openai_body.chat(_model(chat_payload(request), limits), limits.max_tokens)
        call = UpstreamCall("POST", CHAT, inference.body)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
        answer = inference.body["max_tokens"]
        made = shell(request, inference.model or "", tools, request.max_output_tokens)
        reply: Reply = (
            ResponseStreamReply(made, _kept) if request.stream else ResponseReply(made, _kept)
        )
        ask = Ask(call, answer, inference.strict, model=inference.model)
        return Prepared(
            call, reply, inference.model, bool(request.stream), end_user=request.user, ask=ask
        )

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        assert prepared.reply is not None
        return await context.send(prepared.call, prepared.reply)


def _kept(response: dict[str, Any]) -> None:
    """Responses are not stored yet: `store` is accepted and nothing is kept."""


class InputTokens:
    """POST /v1/responses/input_tokens: the prompt tokens the backend will see for the request,
    counted as its measure step counts them (no fair turn, nothing charged)."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "input"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(InputTokensRequest, parse_object(raw))
        inference = openai_body.chat(_model(chat_payload(request), limits), limits.max_tokens)
        call = UpstreamCall("POST", CHAT, inference.body)
        ask = Ask(call, 0, charged=False, model=inference.model)
        return Prepared(None, None, inference.model, None, ask=ask)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        tokens = context.prompt_tokens
        if tokens is None:
            raise UpstreamError(502, "The model server cannot count tokens (is it llama-gate's?).")
        body = json_bytes({"object": "response.input_tokens", "input_tokens": tokens})
        return context.delivery.whole(200, body, "application/json")
