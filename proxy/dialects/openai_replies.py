"""OpenAI answers, rendered from the backend's one event stream (`proxy.upstream.events`).

- `StreamReply` relays the stream to a client that asked for one: each chunk's bytes as the
  backend sent them (re-encoded only when its reasoning is taken out), the usage event (which the
  proxy asked for) only when the client asked for usage itself, as the last event before
  `[DONE]`, exactly as OpenAI sends it;
- `AssembledReply` builds the one JSON answer a client that did not ask for a stream expects;
- `BodyReply` passes any other answer through as it arrives (embeddings, models, a backend that
  answered in JSON after all);
- `OneModelReply` answers with one entry of the backend's model list.

Tokens, the time to the first byte and how the answer ended are counted where the events are
read, not here. A chat answer's `<think>...</think>` reasoning is split out as
`reasoning_content` (in the message, or in each chunk's delta), dropped, or kept inline as
generated (`proxy.dialects.reasoning`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.auth.cache import Principal
from proxy.dialects.openai_answer import Answer
from proxy.dialects.reasoning import Reasoning, ThinkSplitter
from proxy.dialects.wire import SSE_CONTENT_TYPE, SSE_HEADERS, json_bytes, sse
from proxy.errors import ModelNotFound
from proxy.pipeline.delivery import Delivery
from proxy.upstream.events import BackendAnswer, Chunk, Done, Ping, Usage

MODEL_LIST_LIMIT = 1 << 20


async def collect(answer: BackendAnswer, kind: str) -> Answer:
    """The backend's stream (`kind` chat or text) as one assembled answer."""
    assembled = Answer(kind)
    async for event in answer.events():
        if isinstance(event, Chunk):
            assembled.add(event.payload)
        elif isinstance(event, Done) and event.usage is not None:
            assembled.usage = event.usage.openai()
            assembled.stop_sequence = event.usage.stop_sequence
    return assembled


def client_usage(usage: Usage) -> bytes:
    """The usage event as OpenAI sends it: llama-gate's backend's own note taken out."""
    if "llama_gate" not in usage.payload:
        return usage.raw
    return sse(json_bytes({k: v for k, v in usage.payload.items() if k != "llama_gate"}))


class ChunkReasoning:
    """Takes each chunk's reasoning out of `delta.content`, choice by choice, as text streams."""

    def __init__(self, mode: Reasoning) -> None:
        self._mode = mode
        self._splitters: dict[object, ThinkSplitter] = {}

    def rewrite(self, payload: dict[str, Any]) -> bool | None:
        """Rewrite the chunk in place: False when nothing of it is left to send, None when it
        is unchanged (its bytes can go on as they came), True when it changed."""
        worth_sending, changed = False, False
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                worth_sending = True
                continue
            splitter = self._splitters.setdefault(choice.get("index", 0), ThinkSplitter())
            content = delta.get("content")
            pieces = splitter.feed(content) if isinstance(content, str) else []
            finished = choice.get("finish_reason") is not None
            if finished:
                pieces += splitter.flush()
            if isinstance(content, str) or pieces:
                answer = "".join(text for thought, text in pieces if not thought)
                thoughts = "".join(text for thought, text in pieces if thought)
                changed = changed or answer != content or bool(thoughts)
                delta["content"] = answer
                if thoughts and self._mode is Reasoning.SPLIT:
                    delta["reasoning_content"] = delta.get("reasoning_content", "") + thoughts
            worth_sending = worth_sending or finished or any(
                delta.get(key) for key in ("role", "content", "reasoning_content", "tool_calls",
                                           "function_call")
            ) or bool(choice.get("logprobs"))  # fmt: skip
        if not (worth_sending or not payload.get("choices")):
            return False
        return True if changed else None


class StreamReply:
    """Relays the backend's SSE stream to a client that asked for one."""

    def __init__(self, usage_wanted: bool, reasoning: Reasoning = Reasoning.KEEP) -> None:
        self._usage_wanted = usage_wanted
        self._reasoning = None if reasoning is Reasoning.KEEP else ChunkReasoning(reasoning)

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        if not answer.streamed:
            return await BodyReply(counts_tokens=True).relay(answer, delivery)
        response = await delivery.open(200, SSE_CONTENT_TYPE, SSE_HEADERS)
        async for batch in answer.batches():
            out: list[bytes] = []
            for event in batch:
                if isinstance(event, Chunk):
                    raw = self._rewritten(event)
                    if raw:
                        out.append(raw)
                elif isinstance(event, Ping):
                    out.append(event.raw)  # a keep-alive: on its way at once
                elif isinstance(event, Done):
                    if self._usage_wanted and event.usage is not None:
                        out.append(client_usage(event.usage))
                    out.append(event.raw)
            if out:
                await delivery.send(b"".join(out))
        await delivery.finish()  # the batches end with Done, or the answer broke off
        return response

    def _rewritten(self, chunk: Chunk) -> bytes:
        if self._reasoning is None:
            return chunk.raw
        changed = self._reasoning.rewrite(chunk.payload)
        if changed is False:
            return b""
        return sse(json_bytes(chunk.payload)) if changed else chunk.raw


class AssembledReply:
    """Builds the one JSON answer of a chat (`chat`) or text (`text`) completion from a stream."""

    def __init__(self, kind: str, reasoning: Reasoning = Reasoning.KEEP) -> None:
        self._kind = kind
        self._reasoning = reasoning

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        if not answer.streamed:
            return await BodyReply(counts_tokens=True).relay(answer, delivery)
        assembled = await collect(answer, self._kind)
        body = json_bytes(assembled.document(self._reasoning))
        return delivery.whole(200, body, "application/json")


class BodyReply:
    """Passes an answer through as it arrives; its usage (when counted) from its last bytes."""

    def __init__(self, counts_tokens: bool) -> None:
        self._counts_tokens = counts_tokens

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        response = await delivery.open(answer.response.status, answer.content_type)
        async for piece in answer.body(self._counts_tokens):
            await delivery.send(piece)
        await delivery.finish()
        return response


async def model_list(answer: BackendAnswer) -> list[dict[str, Any]]:
    """The entries of the backend's model list (`GET /v1/models`)."""
    document = await answer.document()
    listed = document.get("data") if isinstance(document, dict) else None
    return [m for m in listed or () if isinstance(m, dict)]


class ScopedModelsReply:
    """The backend's model list, of only the models a key's scope covers."""

    def __init__(self, caller: Principal) -> None:
        self._caller = caller

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        entries = [e for e in await model_list(answer) if self._caller.may_use(str(e.get("id")))]
        return delivery.whole(
            200, json_bytes({"object": "list", "data": entries}), "application/json"
        )


class OneModelReply:
    """Answers with the entry of the backend's model list whose id is `model`, or a 404."""

    def __init__(self, model: str) -> None:
        self._model = model

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse:
        entries = await model_list(answer)
        for entry in entries:
            if entry.get("id") == self._model:
                return delivery.whole(200, json_bytes(entry), "application/json")
        names = ", ".join(str(m.get("id")) for m in entries) or "none"
        raise ModelNotFound(self._model, names)
