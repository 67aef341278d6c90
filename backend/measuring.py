"""A request's prompt measured as the model will see it, before anything reaches llama.cpp: which
kind of prompt a body holds, its tokens counted (on a worker thread: tokenizing a long prompt
takes a while), and the 400 for a prompt the model cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from backend import tools
from backend.errors import openai_error
from backend.prompts import PromptError, Vocabulary


@dataclass(frozen=True)
class Measured:
    tokens: int  # the prompt's (all inputs' for embeddings)
    plan: tools.ToolPlan | None = None  # how a chat with tools is served
    inputs: list[int] | None = None  # each embedding input's


KIND_PATHS = {
    "chat": "/v1/chat/completions",
    "text": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def prompt_kind(path: str, data: dict[str, Any]) -> str | None:
    """Which kind of prompt a request body holds: by its path, or by its fields."""
    for kind, known in KIND_PATHS.items():
        if path == known:
            return kind
    if path:
        return None
    if "messages" in data:
        return "chat"
    if "prompt" in data:
        return "text"
    return "embeddings" if "input" in data else None


def measure_in_thread(
    vocabulary: Vocabulary, kind: str, data: dict[str, Any], plan: tools.ToolPlan | None
) -> Measured:
    if kind == "chat":
        body = plan.body if plan is not None else data
        grammar = plan.grammar if plan is not None else None
        return Measured(vocabulary.chat(body, grammar), plan)
    if kind == "text":
        return Measured(vocabulary.text(data))
    given = data.get("input")
    inputs = (
        given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    )
    counts = vocabulary.embeddings(inputs)
    return Measured(sum(counts), None, counts)


def prompt_refused(exc: PromptError) -> JSONResponse:
    body = openai_error(str(exc), kind="invalid_request_error", param=exc.param, code=exc.code)
    body["error"].update(exc.details)  # the numbers, for the proxy's own words
    return JSONResponse(body, status_code=400)
