"""A real HTTP server that plays llama_cpp.server for the proxy's tests.

It speaks the OpenAI routes the proxy forwards (chat with SSE streaming, completions,
embeddings, models, and an echo for any other /v1 path), records every request it receives, can
play a model that calls tools (`script`), and can be told to misbehave: answer FastAPI-style
errors, hang, close before or during a response, or pause a stream until the test lets it go on.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.db.localpg import free_port
from tests.listening import Listening

MODEL = "smollm2-test"
MEASURE_PATH = "/llama-gate/prompt-tokens"


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes
    peer: tuple[str, int]  # the proxy's side of the connection: same port = reused connection


SEEN = web.RequestKey("seen", Seen)


def _json(request: web.Request) -> dict[str, Any]:
    body = request[SEEN].body
    return json.loads(body) if body else {}


@dataclass
class FakeUpstream:
    expected_key: str | None = None  # answer 401 {"detail"} unless this bearer key is sent
    # ok | error | hang | close-before-headers | close-mid-stream | end-mid-stream
    mode: str = "ok"
    error_status: int = 500
    error_body: Any = field(default_factory=lambda: {"detail": "model exploded"})
    event_delay: float = 0.02
    tail_delay: float = 0.05  # after [DONE], before the response ends (as sse-starlette does)
    pieces: list[str] = field(default_factory=lambda: ["Hello", " world"])
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments"}
    finish_reason: str = "stop"  # of an answer without tool calls ("length": ran out of tokens)
    stop_sequence: str | None = None  # reported as matched, as llama-gate's backend does
    # What successive chat requests are answered with, each taken in turn when one comes (then
    # `pieces` again): {"content": "..."} or {"tool_calls": [{"name": ..., "arguments": {...}}]}
    # (arguments may also be a string, sent as it is). As llama-gate's backend does, a request
    # with tool_choice "none" is never answered with calls: it gets `pieces` and takes nothing.
    script: list[dict[str, Any]] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: [MODEL])  # what /health and /v1/models say
    cached_tokens: int | None = None  # reported in usage.prompt_tokens_details when set
    embedding_size: int = 1  # each embedding is this many times [0.1, 0.2, 0.3]
    # When set, /health tells the model's limits as llama-gate's backend does, and measuring
    # counts `prompt_size` of each request (refusing one that does not fit, as it does).
    n_ctx: int | None = None
    plain: bool = False  # no /health, as a plain llama_cpp.server: its models are not known
    # Added to every answer: e.g. the CORS headers llama_cpp.server's middleware sends.
    response_headers: dict[str, str] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # when set, a stream waits on it after its first chunk...
    gate_after: int = 0  # ... and this many events more
    seen: list[Seen] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first request
    client_left: asyncio.Event = field(default_factory=asyncio.Event)  # the proxy hung up
    client_left_at: float | None = None  # time.monotonic() of that
    health_checks: int = 0  # GET /health, answered at once and not counted in `seen`
    measured: list[bytes] = field(default_factory=list)  # prompts measured, not in `seen`
    healthy: bool = True  # False: /health answers 503 (the API still works)
    usage: dict[str, Any] | None = None  # the usage a stream ends with (None: USAGE)
    # When set, every prompt_tokens reported (chat usage, /llama-gate/prompt-tokens) is
    # `prompt_size` of the request, as a real backend's counts depend on the prompt.
    sized_prompts: bool = False
    # When set, every chat request is answered with exactly these bytes, as a stream (a
    # recorded backend stream, replayed as it was sent, whatever the request asked)
    recorded: list[bytes] | None = None
    port: int = field(default_factory=free_port)
    _listening: Listening | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._behave], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post(MEASURE_PATH, self._count)
        app.router.add_route("*", "/v1/{tail:.+}", self._echo)
        app.on_response_prepare.append(self._label)
        self._listening = await Listening.start(app, self.port)

    async def _label(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self.response_headers)

    async def stop(self) -> None:
        if self._listening is not None:
            await self._listening.stop()
            self._listening = None

    @web.middleware
    async def _behave(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/health":  # like llama-gate's backend: no key, no lock, no mode
            return await handler(request)
        body = await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen = Seen(request.method, request.path, request.query_string, request.headers, body, peer)
        request[SEEN] = seen
        if request.path == MEASURE_PATH:  # no model request either: counted apart, no mode
            self.measured.append(body)
            if self.expected_key is not None and (
                request.headers.get("Authorization") != f"Bearer {self.expected_key}"
            ):
                return web.json_response({"detail": "Invalid API key"}, status=401)
            return await handler(request)
        self.seen.append(seen)
        self.received.set()
        if self.expected_key is not None and (
            request.headers.get("Authorization") != f"Bearer {self.expected_key}"
        ):
            return web.json_response({"detail": "Invalid API key"}, status=401)
        if self.mode == "error":
            return web.json_response(self.error_body, status=self.error_status)
        if self.mode == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self._left()
                raise
        if self.mode == "close-before-headers":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.1)
        return await handler(request)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = _json(request)
        if self.recorded is not None:
            return await self._replay(request, self.recorded)
        answer = self._scripted(payload)
        if not payload.get("stream"):
            message = {"role": "assistant", "content": "".join(self.pieces)}
            usage = {**USAGE, **self._prompt(payload)}
            return web.json_response(_completion("chat.completion", {"message": message}, usage))
        chunks = [_chunk({"delta": {"role": "assistant", "content": ""}})]
        if answer is not None and "tool_calls" in answer:
            chunks += _call_chunks(answer["tool_calls"])
            finish = "tool_calls"
        else:
            pieces = [answer["content"]] if answer is not None else self.pieces
            chunks += [_chunk({"delta": {"content": piece}}) for piece in pieces]
            finish = self.finish_reason
            if answer is None and self.tool_calls:
                chunks += _call_chunks(self.tool_calls)
                finish = "tool_calls"
        chunks.append(_chunk({"delta": {}, "finish_reason": finish}))
        return await self._stream(request, payload, chunks)

    def _scripted(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        if not self.script:
            return None
        if payload.get("tool_choice") == "none" and "tool_calls" in self.script[0]:
            return None
        return self.script.pop(0)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        payload = _json(request)
        if not payload.get("stream"):
            return web.json_response(_completion("text_completion", {"text": "".join(self.pieces)}))
        chunks = [_text_chunk(piece, None) for piece in self.pieces]
        chunks.append(_text_chunk("", "stop"))
        return await self._stream(request, payload, chunks)

    async def _stream(
        self, request: web.Request, payload: dict[str, Any], chunks: list[str]
    ) -> web.StreamResponse:
        """Streams as llama-gate's backend does: a progress usage event when asked, the chunks
        (with a comment ping), the usage event when asked, [DONE], then a moment before the
        response ends (sse-starlette's), in which an SDK client has usually hung up already."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        options = payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        events = []
        if options.get("llama_gate_progress") is True:
            progress = {"prompt_tokens": USAGE["prompt_tokens"], "completion_tokens": 0}
            progress.update(self._prompt(payload))
            events.append(_usage_chunk(progress))
        events += [chunks[0], ": ping - keeps idle connections open\r\n\r\n", *chunks[1:]]
        if options.get("include_usage") is True:
            usage: dict[str, Any] = {**(self.usage or USAGE), **self._prompt(payload)}
            if self.cached_tokens is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
            # as llama-gate's backend does, before [DONE], naming a stop sequence that matched
            extra = {"stop_sequence": self.stop_sequence} if self.stop_sequence else None
            events.append(_usage_chunk(usage, extra))
        events.append("data: [DONE]\r\n\r\n")
        first_chunk = events.index(chunks[0])
        try:
            for index, event in enumerate(events):
                await response.write(event.encode())
                if index == first_chunk + self.gate_after and self.gate is not None:
                    await self.gate.wait()
                if index == first_chunk + 2 and self.mode == "close-mid-stream":
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if index == first_chunk + 2 and self.mode == "end-mid-stream":
                    await response.write_eof()
                    return response
                await asyncio.sleep(self.event_delay)
            await asyncio.sleep(self.tail_delay)
        except (asyncio.CancelledError, ConnectionResetError):
            self._left()
            raise
        await response.write_eof()
        return response

    async def _replay(self, request: web.Request, recorded: list[bytes]) -> web.StreamResponse:
        """The recorded pieces, each written as it was received; the response ends after the
        last (a recording without `[DONE]` is a stream cut short)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in recorded:
            await response.write(piece)
            await asyncio.sleep(self.event_delay)
        await response.write_eof()
        return response

    def _prompt(self, payload: dict[str, Any]) -> dict[str, int]:
        sized = self.sized_prompts or self.n_ctx is not None
        return {"prompt_tokens": prompt_size(payload)} if sized else {}

    def _left(self) -> None:
        self.client_left_at = time.monotonic()
        self.client_left.set()

    async def _embeddings(self, request: web.Request) -> web.Response:
        inputs = _json(request).get("input", "")
        count = len(inputs) if isinstance(inputs, list) else 1
        vector = [0.1, 0.2, 0.3] * self.embedding_size
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)]
        usage = {"prompt_tokens": 3, "total_tokens": 3}
        return web.json_response({"object": "list", "data": data, "model": MODEL, "usage": usage})

    async def _count(self, request: web.Request) -> web.Response:
        payload = _json(request)
        if self.n_ctx is None:
            return web.json_response(
                {"prompt_tokens": USAGE["prompt_tokens"], **self._prompt(payload)}
            )
        inputs = payload.get("input")
        if inputs is not None:  # embeddings: a token per character, as a stand-in
            sizes = [len(i) for i in (inputs if isinstance(inputs, list) else [inputs])]
            return web.json_response(
                {"prompt_tokens": sum(sizes), "inputs": sizes, "n_ctx": self.n_ctx}
            )
        size = prompt_size(payload)
        if size >= self.n_ctx:
            error = {
                "message": "too long",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
                "prompt_tokens": size,
                "n_ctx": self.n_ctx,
            }
            return web.json_response({"error": error}, status=400)  # fmt: skip
        return web.json_response({"prompt_tokens": size, "n_ctx": self.n_ctx})

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if not self.healthy:
            return web.json_response({"status": "loading"}, status=503)
        if self.plain:
            return web.json_response({"detail": "Not Found"}, status=404)
        health: dict[str, Any] = {"status": "ok", "models": self.models, "default": self.models[0]}
        if self.n_ctx is not None:
            limits = {"n_ctx": self.n_ctx, "max_token_bytes": 16, "overhead": 32}
            health["limits"] = {model: limits for model in self.models}
        return web.json_response(health)

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": model, "object": "model", "owned_by": "me", "created": 1700000000}
            for model in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _echo(self, request: web.Request) -> web.Response:
        seen = request[SEEN]
        return web.json_response(
            {"method": seen.method, "path": seen.path, "query": seen.query, "bytes": len(seen.body)}
        )


def prompt_size(payload: dict[str, Any]) -> int:
    """A stand-in for a prompt's token count: the length of what a chat template renders
    (messages, tools, tool_choice), so any difference in what was sent changes it."""
    rendered = {name: payload.get(name) for name in ("messages", "tools", "tool_choice")}
    return len(json.dumps(rendered, sort_keys=True))


def _completion(
    kind: str, choice: dict[str, Any], usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    usage = usage or USAGE
    return {
        "id": "cmpl-1",
        "object": kind,
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", **choice}],
        "usage": usage,
    }


def _chunk(choice: dict[str, Any]) -> str:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "finish_reason": None, **choice}],
    }
    return f"data: {json.dumps(body)}\r\n\r\n"


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def _call_chunks(calls: list[dict[str, Any]]) -> list[str]:
    """A chat stream's tool calls as llama-gate's backend sends them, arguments in two pieces."""
    chunks = []
    for index, call in enumerate(calls):
        arguments = call["arguments"]
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        half = len(text) // 2
        call_id = call.get("id") or f"call_{index}_{len(text)}"
        first = {"index": index, "id": call_id, "type": "function",
                 "function": {"name": call["name"], "arguments": text[:half]}}  # fmt: skip
        chunks.append(_chunk({"delta": {"content": None, "tool_calls": [first]}}))
        rest = {"index": index, "function": {"arguments": text[half:]}}
        chunks.append(_chunk({"delta": {"tool_calls": [rest]}}))
    return chunks


def _text_chunk(text: str, finish_reason: str | None) -> str:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body)}\r\n\r\n"


def _usage_chunk(usage: dict[str, Any] | None = None, extra: Any = None) -> str:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": usage or USAGE,
    }
    if extra is not None:
        body["llama_gate"] = extra
    return f"data: {json.dumps(body)}\n\n"
