"""POST /stream: a chat answer as server-sent events of text, the local-server way.

The body is create_message's (`message`, `history`, `tools`, `max_new_tokens`, `temperature`,
`model`; `tool_results` are not processed here, and the model answers in text). The answer is
`data: {"delta": "..."}` per piece of text, then `data: {"done": true, "finish_reason": ...,
"usage": {...}, "model": ...}`. An error before the stream begins is one `data: {"error": ...}`
event with the HTTP status; one after it began is a `data: {"error": ...}` event, then the end.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from proxy.dialects.conversation import Message, StreamRequest, answer_length, chat_body
from proxy.dialects.local import error_body
from proxy.dialects.openai_body import checked, parse_object
from proxy.dialects.wire import SSE_CONTENT_TYPE, SSE_HEADERS, json_bytes, sse
from proxy.errors import ApiError, InvalidRequest
from proxy.limits.prompts import Ask
from proxy.pipeline.delivery import ClientGone, Delivery
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared
from proxy.upstream.events import BackendAnswer, BackendBrokeOff, Chunk, Done, Ping
from proxy.upstream.forward import UpstreamCall

log = logging.getLogger(__name__)


def _event(payload: dict[str, Any]) -> bytes:
    return sse(json_bytes(payload))


class StreamDialect:
    def error(self, exc: ApiError, request_id: str) -> web.Response:
        response = web.Response(
            status=exc.status, body=_event(error_body(exc)), headers=exc.headers
        )
        response.content_type = "text/event-stream"
        return response


DIALECT = StreamDialect()


class Stream:
    """POST /stream."""

    dialect = DIALECT
    reads_body = True
    prompt_param = "message"

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        params = checked(StreamRequest, parse_object(raw))
        conversation = list(params.history)
        if params.message is not None:
            conversation.append(Message(role="user", content=params.message))
        if not conversation:
            raise InvalidRequest("'message' is required (or a 'history' to answer).", "message")
        model = params.model or limits.default_model
        answer = answer_length(params.max_new_tokens, limits.max_tokens)
        body = chat_body(
            conversation,
            params.tools if params.tools is not None else limits.declared_tools,
            tool_choice="none",
            max_tokens=answer,
            temperature=params.temperature,
            model=model,
        )
        call = UpstreamCall("POST", "/v1/chat/completions", body)
        strict = params.max_new_tokens is not None and params.max_new_tokens <= limits.max_tokens
        ask = Ask(call, answer, strict, model=model)
        return Prepared(call, DeltaStream(), model, True, ask=ask)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        assert prepared.call is not None
        assert prepared.reply is not None
        return await context.send(prepared.call, prepared.reply)


class DeltaStream:
    """The backend's OpenAI stream as `{"delta"}` events, ending with finish reason and usage."""

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        response = await delivery.open(200, SSE_CONTENT_TYPE, SSE_HEADERS)
        try:
            await self._relay(answer, delivery)
        except (BackendBrokeOff, ApiError) as exc:
            await _say_error(delivery, exc)
            raise
        return response

    async def _relay(self, answer: BackendAnswer, delivery: Delivery) -> None:
        finish, model = None, None
        async for batch in answer.batches():
            out: list[bytes] = []
            for event in batch:
                if isinstance(event, Ping):
                    out.append(event.raw)  # a keep-alive comment: on its way at once
                elif isinstance(event, Chunk):
                    named = event.payload.get("model")
                    model = named if isinstance(named, str) else model
                    for delta in event.deltas:
                        if delta.text:
                            out.append(_event({"delta": delta.text}))
                        finish = delta.finish or finish
                elif isinstance(event, Done):
                    usage = event.usage.openai() if event.usage is not None else None
                    out.append(_event({"done": True, "finish_reason": finish, "usage": usage,
                                       "model": model}))  # fmt: skip
            if out:
                await delivery.send(b"".join(out))
        await delivery.finish()


async def _say_error(delivery: Delivery, exc: Exception) -> None:
    """Tell the client in the stream why it ends here (best effort: it may be gone)."""
    if isinstance(exc, ApiError):
        said = error_body(exc)
    else:
        said = {"error": f"The model server broke off the answer ({exc}). Try again."}
    try:
        await delivery.send(_event(said))
    except (ClientGone, ApiError):
        log.info("could not tell the client why its stream ended: %s", exc)
