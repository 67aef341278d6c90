"""The errors a request can end with, in no API's shape yet: each dialect renders them its way.

Each `ApiError` knows its HTTP status, OpenAI `type` and `code` (the vocabulary the other dialects
map from), the request field it is about, and extra headers. Messages are sentences that say what
to do next and never contain a key, a DSN or a backend address.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    status = 500
    type = SERVER_ERROR
    code: str | None = None

    def __init__(
        self, message: str, headers: Mapping[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return error_body(self.message, self.type, self.code, self.param)

    @property
    def reason(self) -> str:
        """What the audit row's `error` says: the code for refusals, the message for failures."""
        return self.code if self.code and self.status < 500 else f"{self.code}: {self.message}"


class InvalidApiKey(ApiError):
    """One answer for a missing, malformed, unknown, revoked or expired key or disabled user."""

    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__(
            "Invalid API key. Send your llama-gate key as `Authorization: Bearer <key>`; if it "
            "stopped working, ask your administrator for a new one.",
            {"WWW-Authenticate": "Bearer"},
        )


class KeyOutOfScope(ApiError):
    """A key used for a model or an API its scope leaves out (`create-key --models/--apis`)."""

    status = 403
    type = "permission_error"
    code = "key_out_of_scope"

    def __init__(self, what: str, allowed: Sequence[str], param: str | None = None) -> None:
        super().__init__(
            f"This API key may not use {what}; it may use {', '.join(allowed)}. Use another key, "
            "or ask your administrator for one that covers it.",
            param=param,
        )

    @classmethod
    def model(cls, model: str, scope: Sequence[str]) -> KeyOutOfScope:
        shown = model if len(model) <= 80 else model[:77] + "..."
        return cls(f"the model {shown!r}", scope, param="model")


class KeyStoreUnavailable(ApiError):
    status = 503
    code = "key_store_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The key store is unavailable, so this API key cannot be checked right now. "
            "Try again in a minute.",
            {"Retry-After": "5"},
        )


def _retry_headers(retry_after_ms: int) -> dict[str, str]:
    return {
        "Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(retry_after_ms),
    }


class TooManyAuthFailures(ApiError):
    status = 429
    type = "requests"
    code = "too_many_authentication_failures"

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            "Too many requests with invalid API keys came from your address; try again in "
            f"{max(1, math.ceil(retry_after_ms / 1000))} s with a valid key.",
            _retry_headers(retry_after_ms),
        )


class RateLimited(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, limit: int, window_seconds: int, retry_after_ms: int,
                 headers: Mapping[str, str], whose: str | None = None) -> None:  # fmt: skip
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        of = f" of {whose}" if whose else ""
        super().__init__(
            f"Rate limit{of} reached: at most {limit} requests per {window_seconds} s. "
            f"Try again in {seconds} s.",
            {**headers, **_retry_headers(retry_after_ms)},
        )


class TooManyConcurrent(ApiError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, limit: int, whose: str | None = None) -> None:
        of = f"the requests of {whose}" if whose else "your requests"
        super().__init__(
            f"Concurrency limit reached: at most {limit} of {of} may be in flight or "
            "queued at once. Wait for one to finish, then try again.",
            _retry_headers(1000),
        )


class TokenQuotaExceeded(ApiError):
    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"

    def __init__(self, quota: str, used: int, limit: int, retry_after_ms: int,
                 headers: Mapping[str, str]) -> None:  # fmt: skip
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        super().__init__(
            f"Token quota reached: you used {used} of your {limit} tokens per {quota}. "
            f"Try again in {seconds} s, or ask your administrator for a larger quota.",
            {**headers, **_retry_headers(retry_after_ms)},
        )


class BudgetReached(TokenQuotaExceeded):
    """A budget that applies to the request (a group's, or its key's) is spent for the period;
    the code says whose: `group_budget_exceeded` or `key_budget_exceeded`."""

    code = "group_budget_exceeded"

    def __init__(self, holder: str, period: str, used: int, budget: int, resets_at: str,
                 retry_after_ms: int, headers: Mapping[str, str]) -> None:  # fmt: skip
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        if holder.startswith("key "):
            self.code = "key_budget_exceeded"
        ApiError.__init__(
            self,
            f"Budget reached: {holder} used {used} of its {budget} tokens per {period}; it "
            f"resets at {resets_at} (in {seconds} s). Try again then, or ask your administrator "
            "for a larger budget.",
            {**headers, **_retry_headers(retry_after_ms)},
        )


class QueueTimeout(ApiError):
    status = 503
    code = "queue_timeout"

    def __init__(self, waited_seconds: float, retry_after_seconds: int) -> None:
        super().__init__(
            f"The model is busy: your request waited {waited_seconds:.0f} s for its turn. "
            f"Try again in {retry_after_seconds} s, or send fewer requests at once.",
            {"Retry-After": str(retry_after_seconds)},
        )


class BodyTooLarge(ApiError):
    status = 413
    type = INVALID_REQUEST
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than this server accepts ({limit} bytes); "
            "send a shorter prompt or fewer inputs."
        )


class InvalidJson(ApiError):
    status = 400
    type = INVALID_REQUEST
    code = "invalid_json"

    def __init__(self, detail: str) -> None:
        super().__init__(f"The request body is not valid JSON ({detail}); send a JSON object.")


class UpstreamError(ApiError):
    """The model server could not be used; `status` is 502, 503 or 504."""

    code = "model_server_unavailable"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, {"Retry-After": "5"} if status == 503 else None)
        self.status = status


class UpstreamBrokeOff(UpstreamError):
    """The backend's answer broke off before any of it reached the client."""

    def __init__(self, why: str) -> None:
        super().__init__(502, f"The model server broke its answer off ({why}). Try again.")
        self.why = why

    @property
    def reason(self) -> str:
        """What a stream broken off after it began records too: the same row either way."""
        return self.why


class UpstreamUnreachable(UpstreamError):
    """The connection to the backend failed: nothing of the request reached it."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class InvalidRequest(ApiError):
    """A field of the request is wrong; `param` names it."""

    status = 400
    type = INVALID_REQUEST
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param)


class NotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    code = "unknown_url"

    def __init__(self, method: str, path: str) -> None:
        shown = path if len(path) <= 80 else path[:77] + "..."
        super().__init__(f"Invalid URL ({method} {shown}): see the API paths this server serves.")


class ResponseNotFound(ApiError):
    """A stored response that is not there for this caller (never made, another user's, deleted
    or past its retention): all the same to the caller, as OpenAI's API answers."""

    status = 404
    type = INVALID_REQUEST
    code = "not_found"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        shown = response_id if len(response_id) <= 80 else response_id[:77] + "..."
        super().__init__(f"Response with id '{shown}' not found.", param=param)


class MethodNotAllowed(ApiError):
    status = 405
    type = INVALID_REQUEST
    code = "method_not_allowed"

    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"Method {method} is not allowed here; use {allowed}.", {"Allow": allowed})


class InternalError(ApiError):
    """A bug in the proxy: the client hears that it is logged, never what it was."""

    code = "internal_error"

    def __init__(self) -> None:
        super().__init__(
            "The proxy failed unexpectedly; the error is logged. Try again, and tell your "
            "administrator if it keeps happening."
        )


class ModelNotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    code = "model_not_found"

    def __init__(self, model: str, known: str, models: Sequence[str] = ()) -> None:
        shown = model if len(model) <= 80 else model[:77] + "..."
        super().__init__(
            f"The model {shown!r} does not exist; the models here are: {known}", param="model"
        )
        self.models = list(models)  # for APIs that list them apart (JSON-RPC's error.data)


class RequestTimeout(ApiError):
    status = 408
    type = INVALID_REQUEST
    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"The request body did not arrive within {seconds:g} s; send it whole, at once."
        )


class ExpectationFailed(ApiError):
    status = 417
    type = INVALID_REQUEST
    code = "expectation_failed"

    def __init__(self) -> None:
        super().__init__("Only `Expect: 100-continue` is understood here; send no other Expect.")


class AnswerTooLarge(ApiError):
    """The model's answer grew past LLAMA_PROXY_MAX_ANSWER_BYTES; it is cut there."""

    status = 502
    code = "answer_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The answer grew larger than this server returns ({limit} bytes); ask for fewer "
            "tokens or fewer logprobs."
        )


class ContextLengthExceeded(InvalidRequest):
    """The prompt (with the answer it asks room for) does not fit the model's context."""

    status = 400
    type = INVALID_REQUEST
    code = "context_length_exceeded"

    def __init__(
        self,
        prompt_tokens: int,
        n_ctx: int,
        answer: int = 0,
        param: str | None = "messages",
        at_least: bool = False,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx
        self.answer = answer
        size = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        if answer:
            message = (
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{'at least ' if at_least else ''}{prompt_tokens + answer} tokens ({size} in "
                f"the prompt, {answer} for the answer). Shorten the prompt or ask for fewer "
                "max_tokens."
            )
        else:
            message = (
                f"This model's maximum context length is {n_ctx} tokens, and the prompt is "
                f"{size} tokens. Shorten the prompt."
            )
        super().__init__(message, param)

    @property
    def maximum(self) -> int:
        """The longest prompt the request could have had."""
        return self.n_ctx - max(self.answer, 1)


class PromptFarTooLong(ContextLengthExceeded):
    """A body so much larger than any model's context that it is refused before it is parsed;
    its prompt's tokens are estimated from its bytes (each token is at most the longest's)."""

    def __init__(self, size: int, n_ctx: int, max_token_bytes: int, param: str) -> None:
        super().__init__(max(size // max(max_token_bytes, 1), n_ctx + 1), n_ctx, 0, param, True)
        self.message = (
            f"The request is {size:,} bytes: far more than any prompt the models here can read "
            f"(their contexts hold at most {n_ctx:,} tokens, about {n_ctx * max_token_bytes:,} "
            "bytes of text). Send a shorter prompt."
        )


class RequestTooLarge(InvalidRequest):
    """A request that no quota or bound could ever let through (never worth retrying)."""

    code = "request_too_large"


class AnswerBudgetSpent(ApiError):
    """A request that asks the model again has no answer tokens left (its cap, or its quota)."""

    status = 429
    type = "tokens"
    code = "answer_budget_spent"

    def __init__(self) -> None:
        super().__init__(
            "This request has used every answer token its cap (or token quota) allows; ask "
            "for a shorter answer, or try again later."
        )


class SlotsUnavailable(Exception):
    """Shared backend slots cannot be asked for (Postgres away): take the path in memory."""
