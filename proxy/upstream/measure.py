"""Measuring a prompt on a backend, without a fair turn: `POST /llama-gate/prompt-tokens`.

llama-gate's backend renders and tokenizes the request exactly as a completion would, off its
model's lock (`backend.prompts`), so this answers at once even while the model generates for
someone else. A plain llama_cpp.server has no such route: its 404 means "cannot be measured".
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.errors import ApiError, UpstreamError, UpstreamUnreachable
from proxy.upstream.backends import Upstream
from proxy.upstream.errors import backend_refusal
from proxy.upstream.forward import NOT_REACHABLE, UpstreamCall

log = logging.getLogger(__name__)

PATH = "/llama-gate/prompt-tokens"
ANSWER_LIMIT = 64 * 1024
MEASURE_SECONDS = 30.0  # a prompt of the largest size a context can hold takes well under 1 s


@dataclass(frozen=True)
class Count:
    prompt_tokens: int  # all inputs' for embeddings
    inputs: tuple[int, ...] = ()  # each embedding input's
    n_ctx: int | None = None  # the model's context, when the backend said


async def measure(
    session: aiohttp.ClientSession, upstream: Upstream, call: UpstreamCall, request_id: str
) -> Count | None:
    """The prompt tokens of `call` as `upstream` counts them; None when it cannot count
    (not llama-gate's backend); an `ApiError` when it refuses the request."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key.reveal()}"
    try:
        async with (
            asyncio.timeout(MEASURE_SECONDS),
            session.post(
                upstream.url(PATH, ""), data=call.data, headers=headers, allow_redirects=False
            ) as response,
        ):
            raw = await response.content.read(ANSWER_LIMIT)
            status = response.status
    except TimeoutError:
        raise UpstreamError(
            504, f"{NOT_REACHABLE}: it did not measure the prompt in time."
        ) from None
    except aiohttp.ClientConnectorError:
        raise UpstreamUnreachable(
            f"{NOT_REACHABLE}: it is not running or still starting."
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(502, f"{NOT_REACHABLE}: {type(exc).__name__}. Try again.") from None
    if status in (404, 405):
        return None
    answer = _object(raw)
    if status >= 400:
        raise _refused(status, answer, upstream)
    tokens, inputs = answer.get("prompt_tokens"), answer.get("inputs") or []
    if type(tokens) is not int or not all(type(n) is int for n in inputs):
        raise UpstreamError(502, "The model server measured the prompt in a way not understood.")
    n_ctx = answer.get("n_ctx")
    return Count(tokens, tuple(inputs), n_ctx if type(n_ctx) is int and n_ctx > 0 else None)


def _object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _refused(status: int, answer: dict[str, Any], upstream: Upstream) -> ApiError:
    error = answer.get("error")
    if status >= 500 or not isinstance(error, dict):
        log.error("backend %s failed to measure a prompt (HTTP %d)", upstream.name, status)
        return UpstreamError(502, "The model server failed to measure the prompt. Try again.")
    return backend_refusal(status, error)
