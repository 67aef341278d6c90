"""Backend health: one `GET /health` per probe, which never waits for the model lock.

llama-gate's backend (`python -m backend serve`) answers `/health` at once, even during a long
generation, with `{"status": "ok", "models": [aliases], "default": alias, "limits": {alias:
{"n_ctx", "max_token_bytes", "overhead", ...}}}`: that says that it is up, which models it serves
and how large a prompt each takes (what the proxy needs to know whether a request must be
measured before its turn: `proxy.limits.prompts`). A plain llama_cpp.server has no `/health`
(every route of its own waits for the model lock); its 404 still proves it is up, and its models
and limits stay unknown, so it is sent any model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL


@dataclass(frozen=True)
class ModelLimits:
    """What bounds one model's prompts, as its backend says."""

    n_ctx: int  # the context: prompt and answer together
    max_token_bytes: int  # no token is longer: n bytes of text are at least n / this tokens
    overhead: int  # tokens a prompt has beyond its request's JSON bytes, at most


@dataclass(frozen=True)
class Health:
    problem: str | None = None  # None: up
    models: frozenset[str] | None = None  # None: unknown, so it may serve any model
    default: str | None = None  # the model it answers a request that names none with
    limits: Mapping[str, ModelLimits] = field(default_factory=dict)  # by model, when told

    @property
    def up(self) -> bool:
        return self.problem is None


async def probe_health(
    session: aiohttp.ClientSession,
    url: URL,
    timeout: float,  # noqa: ASYNC109 - one budget for connecting and answering
) -> Health:
    """What the backend's `/health` at `url` says, or why it could not be asked."""
    try:
        async with (
            asyncio.timeout(timeout),
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status in (404, 405):
                return Health()  # up, but not llama-gate's backend: models unknown
            if response.status != 200:
                return Health(f"/health answered HTTP {response.status}")
            try:
                body: Any = await response.json(content_type=None)
            except ValueError:
                body = None
    except TimeoutError:
        return Health(f"no answer within {timeout:g} s")
    except aiohttp.ClientConnectorError as exc:
        return Health(exc.os_error.strerror or type(exc.os_error).__name__)
    except aiohttp.ClientError as exc:
        return Health(type(exc).__name__)
    return _parse(body)


def _parse(body: Any) -> Health:
    if not isinstance(body, dict):
        return Health()
    models = body.get("models")
    default = body.get("default")
    known = (
        frozenset(models)
        if isinstance(models, list) and models and all(isinstance(m, str) for m in models)
        else None
    )
    default = default if isinstance(default, str) and known else None
    return Health(None, known, default, _limits(body.get("limits"), known or frozenset()))


def _limits(given: Any, models: frozenset[str]) -> dict[str, ModelLimits]:
    if not isinstance(given, dict):
        return {}
    limits = {}
    for model, numbers in given.items():
        if model not in models or not isinstance(numbers, dict):
            continue
        n_ctx, longest, overhead = (
            numbers.get(k) for k in ("n_ctx", "max_token_bytes", "overhead")
        )
        if (
            isinstance(n_ctx, int)
            and isinstance(longest, int)
            and isinstance(overhead, int)
            and min(n_ctx, longest, overhead) > 0
        ):
            limits[model] = ModelLimits(n_ctx, longest, overhead)
    return limits
