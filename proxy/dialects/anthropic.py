"""Anthropic's Messages API on the pipeline: `/v1/messages` and `/v1/messages/count_tokens`.

The requests are translated to the backend's OpenAI chat API (`proxy.dialects.anthropic_body`)
and the answers back (`proxy.dialects.anthropic_replies`); keys, limits, the fair queue, the
max_tokens cap and the audit row are the pipeline's, as for every route. A streamed request's
answer begins at once: it carries `ping` events while the request waits for a backend, and a
failure before the model answers is the stream's `event: error`.
"""

from __future__ import annotations

from aiohttp import web

from proxy.dialects.anthropic_body import chat_body, generation_body
from proxy.dialects.anthropic_errors import DIALECT, error_event
from proxy.dialects.anthropic_replies import (
    PING_SECONDS,
    MessageReply,
    MessageStreamReply,
    Pinger,
    Thoughts,
)
from proxy.dialects.anthropic_types import CountTokensRequest, MessagesRequest
from proxy.dialects.openai_body import checked, parse_object
from proxy.dialects.wire import json_bytes
from proxy.errors import ApiError, UpstreamError
from proxy.limits.prompts import Ask
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared
from proxy.upstream.forward import UpstreamCall


class Messages:
    """POST /v1/messages; `thoughts` None: thinking blocks when the request enables thinking."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "messages"

    def __init__(self, thoughts: Thoughts | None = None, ping_seconds: float = PING_SECONDS):
        self._thoughts = thoughts
        self._ping_seconds = ping_seconds

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(MessagesRequest, parse_object(raw))
        thoughts = self._thoughts
        if thoughts is None:
            enabled = request.thinking is not None and request.thinking.type != "disabled"
            thoughts = Thoughts.BLOCKS if enabled else Thoughts.DROP
        body = generation_body(request, limits.max_tokens)
        call = UpstreamCall("POST", "/v1/chat/completions", body)
        end_user = request.metadata.user_id if request.metadata is not None else None
        strict = request.max_tokens <= limits.max_tokens  # asked for, not only allowed
        return Prepared(
            call,
            None,
            request.model,
            bool(request.stream),
            extra={"thoughts": thoughts},
            end_user=end_user,
            ask=Ask(call, body["max_tokens"], strict, model=request.model),
        )

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        model, thoughts = prepared.model or "", prepared.extra["thoughts"]
        if not prepared.stream:
            return await context.send(prepared.call, MessageReply(model, thoughts))
        delivery = context.delivery
        # The stream opens when the model answers, or, while the request still waits for its
        # turn, after the first ping interval: until then a refusal is a plain error answer.
        pinger = Pinger(delivery, self._ping_seconds)
        pinger.start()
        try:
            return await context.send(prepared.call, MessageStreamReply(model, thoughts, pinger))
        except ApiError as exc:  # before the model answered (queue timeout, no backend, ...)
            await pinger.stop()
            if delivery.response is None:
                raise
            await delivery.fail(exc.status, exc.reason, error_event(exc))
            return delivery.response
        finally:
            await pinger.stop()


class CountTokens:
    """POST /v1/messages/count_tokens: the prompt tokens the backend will see, as its measure
    step counts them (off the model's lock: no fair turn, nothing charged)."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "messages"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        request = checked(CountTokensRequest, parse_object(raw))
        call = UpstreamCall("POST", "/v1/chat/completions", chat_body(request))
        ask = Ask(call, 0, charged=False, model=request.model)
        return Prepared(None, None, request.model, None, ask=ask)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        tokens = context.prompt_tokens
        if tokens is None:
            raise UpstreamError(502, "The model server cannot count tokens (is it llama-gate's?).")
        body = json_bytes({"input_tokens": tokens})
        return context.delivery.whole(200, body, "application/json")
