"""The measure step: a request's prompt in tokens, known before it may take a fair turn.

Each inference request says what it will ask of the model (`Ask`: the backend request, and the
answer it asks room for). Before the quota and the rate limit are asked, the prompt is measured
by a backend that serves its model (`proxy.upstream.measure`: rendered and tokenized exactly as
the completion will be, off the model's lock, in milliseconds). So:

- a prompt that does not fit the model's context is a 400 (`ContextLengthExceeded`) that spent
  nothing, never a 5xx or a stream that breaks. The answer's room is what the client asked for
  itself (within its cap): a prompt leaving less is refused, as OpenAI's API refuses it; a
  client that asked for more than its cap, or for nothing, gets what the context has left;
- the token quota is asked with what the request can cost (prompt + answer) before admitting it
  (`proxy.limits.quotas`);
- an embeddings request is bounded: at most `LLAMA_PROXY_MAX_EMBEDDING_INPUTS` inputs and
  `LLAMA_PROXY_MAX_EMBEDDING_TOKENS` tokens in all.

A request that cannot matter is not measured, so small requests pay no extra round trip: its
JSON body's bytes plus what a template adds (`ModelLimits.overhead`, the backend's own figure)
leave room for its answer, and its caller has no token quota. A text so long that even its
longest tokens (`max_token_bytes` each) could not fit is refused here without asking anyone. A
backend that cannot measure (a plain llama_cpp.server) leaves the request unmeasured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.errors import ContextLengthExceeded, PromptFarTooLong, RequestTooLarge
from proxy.settings import Settings
from proxy.upstream.backends import Backends
from proxy.upstream.forward import UpstreamCall
from proxy.upstream.measure import measure
from proxy.upstream.probes import ModelLimits

EMBEDDINGS = "/v1/embeddings"
SLACK = 1 << 20  # bytes of a body that may be no prompt (schemas, settings, JSON itself)
# The backend routes whose requests hold a prompt.
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", EMBEDDINGS})


@dataclass(frozen=True)
class Ask:
    """What a request will ask of the model."""

    call: UpstreamCall  # the backend request whose prompt is measured
    answer: int  # the tokens its answer may have (within the caller's cap); 0: no answer
    strict: bool = False  # the client asked for `answer` itself: a prompt leaving less is refused
    charged: bool = True  # False: only counted (count_tokens); the model never reads it
    model: str | None = None  # None: the backends' default


@dataclass(frozen=True)
class Measured:
    """What the measure step found."""

    prompt_tokens: int | None  # None: not measured (it could not matter, or cannot be)
    answer: int  # the tokens the answer may have, within the context's room
    inputs: tuple[int, ...] = ()  # each embedding input's tokens


class Prompts:
    """Measures prompts on the backends, deciding first whether it is worth asking."""

    def __init__(
        self,
        settings: Settings,
        backends: Callable[[], Backends],
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._backends = backends  # looked up per request: tests and schedulers replace them
        self._session = session
        self._max_inputs = settings.max_embedding_inputs
        self._max_embedding_tokens = settings.max_embedding_tokens
        # A backend being restarted is waited for as a fair turn would wait for it.
        self._wait = float(
            min(settings.queue_timeout_seconds, settings.backend_restart_wait_seconds)
        )

    async def measure(self, ask: Ask, request_id: str, has_quota: bool, received: int) -> Measured:
        """Measure `ask`'s prompt when it can matter; raise the request's refusal. `received`
        is the size of the client's body (at least the bytes of its text)."""
        body = ask.call.json or {}
        embeddings = ask.call.path == EMBEDDINGS
        if embeddings:
            self._check_inputs(body.get("input"))
        backends = self._backends()
        limits = backends.limits(ask.model)
        unmeasured = Measured(None, ask.answer)
        if limits is not None and received // limits.max_token_bytes >= limits.n_ctx:
            _refuse_if_surely_too_long(body, limits, embeddings)
        if ask.charged and not has_quota and not self._may_overflow(ask, limits, embeddings):
            return unmeasured
        upstream = await backends.any_serving(ask.model, self._wait)
        try:
            count = await measure(self._session(), upstream, ask.call, request_id)
        except ContextLengthExceeded as exc:  # told in the words of what this request asked
            answer = ask.answer if ask.strict else 0
            raise ContextLengthExceeded(exc.prompt_tokens, exc.n_ctx, answer, _param(ask)) from None
        if count is None:
            return unmeasured  # it cannot measure: its own checks are all there is
        if embeddings:
            if count.prompt_tokens > self._max_embedding_tokens:
                raise RequestTooLarge(
                    f"The inputs are {count.prompt_tokens} tokens in all; one request may embed "
                    f"at most {self._max_embedding_tokens}. Send fewer inputs per request.",
                    "input",
                )
            return Measured(count.prompt_tokens, 0, count.inputs)
        n_ctx = count.n_ctx or (limits.n_ctx if limits is not None else None)
        if n_ctx is None:
            return Measured(count.prompt_tokens, ask.answer)
        return Measured(count.prompt_tokens, _room(ask, count.prompt_tokens, n_ctx))

    def refuse_oversized(self, size: int, param: str) -> None:
        """Refuse, before it is parsed, a body so much larger than the text any model here can
        read (its context times its longest token, twice over, plus `SLACK` bytes of anything
        else) that its prompt cannot fit: parsing it would only stall everyone else."""
        largest = self._backends().largest_text()
        if largest is None or size <= 2 * largest + SLACK:
            return
        n_ctx, max_token_bytes = self._backends().largest_context()
        raise PromptFarTooLong(size, n_ctx, max_token_bytes, param)

    def _check_inputs(self, given: Any) -> None:
        if isinstance(given, list) and len(given) > self._max_inputs:
            raise RequestTooLarge(
                f"'input' holds {len(given)} inputs; one request may embed at most "
                f"{self._max_inputs}. Send them in several requests.",
                "input",
            )

    def _may_overflow(self, ask: Ask, limits: ModelLimits | None, embeddings: bool) -> bool:
        """Whether the prompt might not fit, judged by its size alone (never, when the backend
        does not say what bounds its prompts: it is not asked what it cannot tell)."""
        if limits is None:
            return False
        size = len(ask.call.data or b"")
        if embeddings:
            # Every input's tokens are within its bytes (plus one it may start with).
            return size + self._max_inputs > min(limits.n_ctx, self._max_embedding_tokens)
        room = ask.answer if ask.strict else 1
        return size + limits.overhead + room > limits.n_ctx


def _room(ask: Ask, prompt: int, n_ctx: int) -> int:
    """The answer's room for a prompt of `prompt` tokens, or the request's refusal."""
    if ask.strict and prompt + ask.answer > n_ctx:
        raise ContextLengthExceeded(prompt, n_ctx, ask.answer, _param(ask))
    if prompt >= n_ctx:
        raise ContextLengthExceeded(prompt, n_ctx, 0, _param(ask))
    return min(ask.answer, n_ctx - prompt)


def _param(ask: Ask) -> str:
    body = ask.call.json or {}
    return next((name for name in ("messages", "prompt", "input") if name in body), "messages")


def _refuse_if_surely_too_long(
    body: dict[str, Any] | Any, limits: ModelLimits, embeddings: bool
) -> None:
    """Refuse, without asking a backend, a prompt whose text alone cannot fit the context."""
    parts = [body.get(name) for name in ("messages", "prompt", "input", "tools")]
    least = _text_bytes(parts) // limits.max_token_bytes
    if embeddings:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        least = max((_text_bytes(item) // limits.max_token_bytes for item in items), default=0)
    if least >= limits.n_ctx:
        param = "input" if embeddings else ("prompt" if "prompt" in body else "messages")
        raise ContextLengthExceeded(least, limits.n_ctx, 0, param, at_least=True)


def _text_bytes(value: Any) -> int:
    """The UTF-8 bytes of every string in a JSON value."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return total
