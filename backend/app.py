"""The backend's ASGI app: llama_cpp.server's own app, wrapped from outside, never patched.

`create_app` from llama_cpp.server builds the app; `BackendApp` sits in front of it and adds what
llama_cpp.server lacks: a `/health` that never waits for the model lock, a 404 for a model that does
not exist (llama_cpp.server would quietly answer with its first model), the default model's alias
filled in when a request names none, every prompt measured before llama.cpp sees it
(`backend.measuring`), the usage chunk on streams that ask for it (`backend.usage_stream`), tool
calls on streamed chats with tools (`backend.tools`), and the prompt cache (`backend.cache_plan`),
put on the default model at startup and on whichever model a request through this layer reaches
(every request from llama-gate's proxy comes through it). Everything else reaches
llama_cpp.server untouched, so its auth, validation and errors stay its own.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
from llama_cpp.server.app import create_app, get_llama_proxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import tools
from backend.cache_plan import CachePlan, ModelCache
from backend.embeddings import Embedder
from backend.errors import openai_error
from backend.measuring import KIND_PATHS, Measured, measure_in_thread, prompt_kind, prompt_refused
from backend.prompts import PromptError, Vocabulary
from backend.usage_stream import USAGE_STREAMS, Meter, stream_with_usage, wants_usage

logger = logging.getLogger(__name__)

# Where llama-gate's proxy has a request's prompt measured (count_tokens; before a fair turn).
PROMPT_TOKENS_PATH = "/llama-gate/prompt-tokens"
# llama_cpp.server's routes whose JSON body may name a model.
MODEL_PATHS = frozenset(
    {
        PROMPT_TOKENS_PATH,
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/extras/tokenize",
        "/extras/tokenize/count",
        "/extras/detokenize",
    }
)


def create_backend_app(
    server_settings: ServerSettings,
    model_settings: Sequence[ModelSettings],
    cache_plan: CachePlan | None = None,
) -> BackendApp:
    """llama_cpp.server's app for these settings (the first model is the default), wrapped.

    Loads the default model, so this takes as long as that does and raises what loading raises.
    """
    inner = create_app(server_settings=server_settings, model_settings=list(model_settings))
    paths = {model.model_alias or model.model: model.model for model in model_settings}
    first = model_settings[0]
    embedder = Embedder(paths, first.n_ctx, first.n_threads)
    model_cache = ModelCache(cache_plan or CachePlan("off", 0))
    formats = {model.model_alias or model.model: model.chat_format for model in model_settings}
    vocabularies = {
        model.model_alias or model.model: Vocabulary(model.model, model.n_ctx, model.chat_format)
        for model in model_settings
    }
    return BackendApp(
        inner, list(paths), server_settings.api_key, embedder, model_cache, formats, vocabularies
    )


class BackendApp:
    """The ASGI app uvicorn runs: this layer's answers first, llama_cpp.server's for the rest."""

    def __init__(
        self,
        inner: ASGIApp,
        aliases: Sequence[str],
        api_key: str | None,
        embedder: Embedder | None = None,
        model_cache: ModelCache | None = None,
        chat_formats: Mapping[str, str | None] | None = None,
        vocabularies: Mapping[str, Vocabulary] | None = None,
    ) -> None:
        self._inner = inner
        self._embedder = embedder
        self._cache = model_cache or ModelCache(CachePlan("off", 0))
        self._chat_formats = dict(chat_formats or {})  # alias -> LLAMA_CHAT_FORMAT (None: GGUF's)
        self._vocabularies = dict(vocabularies or {})
        self._aliases = frozenset(aliases)
        self._default = aliases[0]
        self._api_key = api_key.encode() if api_key else None
        self._meter = Meter()
        self._health = {
            "status": "ok",
            "models": sorted(aliases),
            "default": self._default,
            "pid": os.getpid(),
            "limits": {alias: v.limits.as_json() for alias, v in self._vocabularies.items()},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._inner(scope, receive, self._after_startup(send))
            return
        if scope["type"] != "http":
            await self._inner(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method in {"GET", "HEAD"}:
            # Answered here, before llama_cpp.server and its model lock: it must come back at
            # once while a long generation runs, since that is when a supervisor asks.
            await JSONResponse(self._health_answer())(scope, receive, send)
            return
        if method != "POST" or path not in MODEL_PATHS or not self._authorized(scope):
            # A request without the key goes on untouched, so llama_cpp.server's 401 comes before
            # any answer of ours, and this layer never buffers a stranger's body.
            await self._inner(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client left before sending its request
        await self._model_request(scope, receive, send, body)

    async def _model_request(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None  # llama_cpp.server answers malformed JSON with its own 422
        if isinstance(data, dict):
            model = data.get("model")
            if model is None:
                # Name the default: otherwise llama_cpp.server reports its file path as "model".
                data["model"] = self._default
                body = json.dumps(data).encode()
                scope = _with_content_length(scope, len(body))
            elif not isinstance(model, str) or model not in self._aliases:
                await self._unknown_model(str(model))(scope, receive, send)
                return
            path = scope["path"]
            if path == PROMPT_TOKENS_PATH:
                await (await self._measure_answer(data))(scope, receive, send)
                return
            try:
                # Before anything reaches llama.cpp: what it cannot serve is a 400 here.
                measured = await self._measure(path, data, streamed=data.get("stream") is True)
            except PromptError as exc:
                await prompt_refused(exc)(scope, receive, send)
                return
            if path == "/v1/embeddings" and self._embedder is not None:
                await (await self._embed_answer(data))(scope, receive, send)
                return
            stream = USAGE_STREAMS.get(path)
            if stream is not None and self._cache.plan.on and _wants_logprobs(data):
                await _no_logprobs()(scope, receive, send)
                return
            plan = measured.plan if measured is not None else None
            if stream is not None and plan is not None:
                # Tools made real (see backend.tools): the rewritten request, its calls read back.
                stream = replace(stream, call=plan.llama_call(usage=wants_usage(data)))
                data = plan.body
            if (
                stream is not None
                and (plan is not None or wants_usage(data))
                and await stream_with_usage(
                    stream, data, scope, receive, send, self._cache, self._meter
                )
            ):
                return
        await self._inner(scope, _replay(body, receive), send)

    async def _measure(self, path: str, data: dict[str, Any], *, streamed: bool) -> Measured | None:
        """The prompt's tokens as the model will see them (None for a request that has none, or
        a model without a vocabulary here); `PromptError` for what the model cannot serve."""
        vocabulary = self._vocabularies.get(data.get("model", self._default))
        if vocabulary is None:
            return None
        kind = prompt_kind(path, data)
        if kind is None:
            return None
        plan = None
        if kind == "chat" and streamed:  # how the proxy asks; llama_cpp's own handler otherwise
            try:
                plan = tools.plan(data, self._chat_formats.get(data["model"]))
            except tools.ToolRequestError as exc:
                raise PromptError(str(exc), exc.param, "invalid_tools") from None
        return await anyio.to_thread.run_sync(measure_in_thread, vocabulary, kind, data, plan)

    async def _measure_answer(self, data: dict[str, Any]) -> JSONResponse:
        """`/llama-gate/prompt-tokens`: a request's prompt tokens, measured as it would be
        served (a chat as the proxy sends it: streamed), or a 400 saying why it cannot be."""
        kind = prompt_kind("", data)
        try:
            measured = await self._measure(
                KIND_PATHS.get(kind or "", ""), data, streamed=kind == "chat"
            )
        except PromptError as exc:
            return prompt_refused(exc)
        if measured is None:
            return JSONResponse(
                openai_error(
                    "nothing to count: send a chat, text or embeddings request body",
                    kind="invalid_request_error",
                ),
                status_code=400,
            )
        vocabulary = self._vocabularies[data.get("model", self._default)]
        answer: dict[str, Any] = {
            "prompt_tokens": measured.tokens,
            "n_ctx": vocabulary.limits.n_ctx,
        }
        if measured.inputs is not None:
            answer["inputs"] = measured.inputs
        return JSONResponse(answer)

    def _after_startup(self, send: Send) -> Send:
        """`send` for the lifespan: the default model gets the prompt cache before serving, so
        requests that reach llama_cpp.server's own handlers use it from the first one on."""

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self._cache.plan.on:
                async with asynccontextmanager(get_llama_proxy)() as llama_proxy:
                    if llama_proxy is not None:
                        self._cache.install(llama_proxy())
            await send(message)

        return sending

    def _health_answer(self) -> dict[str, Any]:
        stats = self._cache.stats()
        health = {**self._health, "evaluated_tokens": self._meter.evaluated}
        if stats is None:
            return {**health, "prompt_cache": {"mode": "off"}}
        cache = {
            "mode": self._cache.plan.mode,
            "states": stats.states,
            "bytes": stats.bytes,
            "capacity_bytes": stats.capacity_bytes,
            "hits": stats.hits,
            "misses": stats.misses,
            "evictions": stats.evictions,
        }
        return {**health, "prompt_cache": cache}

    async def _embed_answer(self, data: dict[str, Any]) -> JSONResponse:
        text = data.get("input")
        if not (
            isinstance(text, str)
            or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
        ):
            return JSONResponse(
                openai_error(
                    "'input' must be a string or a non-empty list of strings",
                    kind="invalid_request_error",
                    param="input",
                    code=None,
                ),
                status_code=400,
            )
        assert self._embedder is not None
        try:
            answer = await anyio.to_thread.run_sync(self._embedder.embed, data["model"], text)
        except ValueError as exc:  # llama_cpp's word for input longer than the context
            return JSONResponse(
                openai_error(str(exc), kind="invalid_request_error", param="input"),
                status_code=400,
            )
        usage = answer.get("usage")
        if isinstance(usage, dict) and type(usage.get("prompt_tokens")) is int:
            self._meter.add(usage["prompt_tokens"])
        return JSONResponse(answer)

    def _authorized(self, scope: Scope) -> bool:
        """The check llama_cpp.server makes (a Bearer token equal to the key), in constant time."""
        if self._api_key is None:
            return True
        scheme, _, credentials = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._api_key
        )

    def _unknown_model(self, model: str) -> JSONResponse:
        known = ", ".join(sorted(self._aliases))
        logger.info("refused a request for unknown model %r", model)
        return JSONResponse(
            openai_error(
                f"The model {model!r} does not exist; the models here are: {known}",
                kind="invalid_request_error",
                param="model",
                code="model_not_found",
            ),
            status_code=404,
        )


def _wants_logprobs(data: dict[str, Any]) -> bool:
    # Chat asks with `logprobs: true`; a text completion with any `logprobs` value at all.
    value = data.get("logprobs")
    return value is True if "messages" in data else value is not None


def _no_logprobs() -> JSONResponse:
    return JSONResponse(
        openai_error(
            "logprobs are not available while the prompt cache is on: the model then keeps "
            "logits for the sampled token only. Ask without logprobs, or run the backend with "
            "LLAMA_PROMPT_CACHE=off",
            kind="invalid_request_error",
            param="logprobs",
            code="logprobs_unavailable",
        ),
        status_code=400,
    )


async def _read_body(receive: Receive) -> bytes | None:
    # Only requests that carry the API key get here, so the size is the proxy's to cap.
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body once, then waits on the real one."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_content_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}
