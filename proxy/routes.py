"""The route table: every API path once, with the endpoint that serves it.

Routing, the admission step's body checks, token counting, the error shape and the metrics label
all come from here; a path that is not in the table is a 404 that never reaches a backend.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.dialects import anthropic, jsonrpc, local, me, openai, responses, stream
from proxy.dialects.anthropic_replies import Thoughts
from proxy.dialects.reasoning import Reasoning
from proxy.pipeline.endpoint import Route
from proxy.settings import Settings

# The APIs a key can be scoped to (`llama-gate create-key --apis`), and what each one covers.
APIS = {
    "chat": "POST /v1/chat/completions (OpenAI chat)",
    "completions": "POST /v1/completions (OpenAI text completions)",
    "embeddings": "POST /v1/embeddings",
    "models": "GET /v1/models and /v1/models/{model}",
    "responses": "/v1/responses and its stored responses (OpenAI's Responses API)",
    "messages": "POST /v1/messages and count_tokens (Anthropic's Messages API)",
    "rpc": "POST /rpc (JSON-RPC 2.0)",
    "local": "POST /stream, /setModel and /restore_cache",
}


def _api(path: str) -> str:
    """The API a route belongs to; "" for /v1/me, which every key may ask (it shows only its own
    user)."""
    if path == "/v1/me":
        return ""
    for prefix, api in (
        ("/v1/chat/", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/models", "models"),
        ("/v1/responses", "responses"),
        ("/v1/messages", "messages"),
        ("/rpc", "rpc"),
    ):
        if path.startswith(prefix):
            return api
    return "local"


def build_routes(settings: Settings) -> tuple[Route, ...]:
    return tuple(replace(route, api=_api(route.path)) for route in _routes(settings))


def _routes(settings: Settings) -> tuple[Route, ...]:
    reasoning = Reasoning(settings.reasoning)
    return (
        Route(
            "/v1/chat/completions",
            "POST",
            openai.Completions("/v1/chat/completions", "chat", reasoning),
            aliases=("/chat/completions",),
        ),
        # The text exactly as generated, reasoning tags and all, whatever the default.
        Route(
            "/v1/chat/completions/think",
            "POST",
            openai.Completions("/v1/chat/completions", "chat", Reasoning.KEEP),
            aliases=("/chat/completions/think",),
        ),
        Route(
            "/v1/completions",
            "POST",
            openai.Completions("/v1/completions", "text"),
            aliases=("/completions",),
        ),
        Route("/v1/embeddings", "POST", openai.Embeddings(), aliases=("/embeddings",)),
        Route("/v1/models", "GET", openai.Models(), aliases=("/models",)),
        Route("/v1/models/{model}", "GET", openai.ModelRetrieve(), aliases=("/models/{model}",)),
        # A key's holder sees their own limits, quotas and usage.
        Route("/v1/me", "GET", me.Me(), aliases=("/me",)),
        # OpenAI's Responses API (Codex speaks only this).
        Route("/v1/responses", "POST", responses.Create(), aliases=("/responses",)),
        Route(
            "/v1/responses/input_tokens",
            "POST",
            responses.InputTokens(),
            aliases=("/responses/input_tokens",),
        ),
        Route("/v1/responses/{id}", "GET", responses.Retrieve(), aliases=("/responses/{id}",)),
        Route("/v1/responses/{id}", "DELETE", responses.Delete(), aliases=("/responses/{id}",)),
        Route(
            "/v1/responses/{id}/input_items",
            "GET",
            responses.InputItems(),
            aliases=("/responses/{id}/input_items",),
        ),
        # Anthropic's Messages API. Its SDK adds /v1/messages to the base URL, and clients are
        # configured with and without /v1 at its end: both spellings reach the same route.
        *(
            Route(f"/v1/messages{tail}", "POST", endpoint, aliases=_anthropic_aliases(tail))
            for tail, endpoint in (
                ("", anthropic.Messages()),
                ("/think", anthropic.Messages(Thoughts.INLINE)),  # reasoning inline, as generated
                ("/clean", anthropic.Messages(Thoughts.DROP)),  # reasoning always dropped
                ("/count_tokens", anthropic.CountTokens()),
            )
        ),
        # The APIs of other local LLM servers (proxy.dialects.jsonrpc, .stream, .local).
        Route("/rpc", "POST", jsonrpc.JsonRpc()),
        Route("/stream", "POST", stream.Stream()),
        Route("/setModel", "POST", local.SetModel()),
        Route("/restore_cache", "POST", local.RestoreCache()),
    )


def _anthropic_aliases(tail: str) -> tuple[str, ...]:
    return (f"/messages{tail}", f"/v1/v1/messages{tail}")
