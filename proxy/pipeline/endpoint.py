"""What a route plugs into the pipeline: how its body is checked, how it is served, how it errs.

An API dialect (OpenAI's, Anthropic's, JSON-RPC, ...) provides `Endpoint`s; the route table
(`proxy.routes`) lists each path once with its endpoint. The pipeline does everything else the
same way for all of them: authentication, the admission step, the fair turn at a backend, the
outcome and the audit row.

A `BatchEndpoint` is the one variation: its request holds several calls (a JSON-RPC batch). The
admission step only reads and checks its envelope; each call then goes through the admission
step itself (place, quota, rate), is served and gets its own outcome and audit row, through
`Context.calls`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from proxy.auth.cache import Principal
from proxy.errors import ApiError
from proxy.limits.prompts import Ask
from proxy.pipeline.delivery import Delivery
from proxy.upstream.events import BackendAnswer
from proxy.upstream.forward import UpstreamCall


class Reply(Protocol):
    """Renders a backend's answer as the client's, in its API's shape, through `delivery`."""

    async def relay(self, answer: BackendAnswer, delivery: Delivery) -> web.StreamResponse: ...


class Dialect(Protocol):
    """How an API spells its errors."""

    def error(self, exc: ApiError, request_id: str) -> web.Response: ...


@dataclass(frozen=True)
class CallerLimits:
    """What a route's check needs to know about the caller (and the deployment's defaults)."""

    max_tokens: int  # the cap on one answer (the caller's own, never above the hard cap)
    default_model: str | None = None  # the caller's own default (POST /setModel), or none
    declared_tools: tuple[Any, ...] = ()  # LLAMA_PROXY_TOOLS_FILE's, for requests naming none


@dataclass(frozen=True)
class Prepared:
    """A checked request: what to ask the backend and how to answer the client."""

    call: UpstreamCall | None
    reply: Reply | None
    model: str | None = None
    stream: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the endpoint's serve needs
    end_user: str | None = None  # whom the client says the request is for, when it says
    ask: Ask | None = None  # what it will ask of the model: measured and charged before its turn


@dataclass
class Context:
    """What an endpoint's `serve` gets: the caller, the client side, and a turn at a backend."""

    caller: Principal
    delivery: Delivery
    request_id: str
    send: Callable[[UpstreamCall, Reply], Awaitable[web.StreamResponse]]
    calls: Calls | None = None  # a BatchEndpoint's: admits each call of the batch alone
    prompt_tokens: int | None = None  # the prompt as measured before the turn, if it was
    answer_left: Callable[[], int | None] = lambda: None  # answer tokens it may still generate


@dataclass
class AdmittedCall:
    """One call of a batch, admitted: what its check made of it, and its own turn and outcome."""

    prepared: Prepared
    context: Context  # its own delivery (never opened: the batch answers once) and outcome

    def answered(self, size: int) -> None:
        """The call's answer (`size` bytes of the batch's answer) is made: it succeeded."""
        outcome = self.context.delivery.outcome
        outcome.status, outcome.complete = 200, True
        outcome.bytes_out += size


class Calls(Protocol):
    def call(
        self, method: str, size: int, check: Callable[[CallerLimits], Prepared]
    ) -> AbstractAsyncContextManager[AdmittedCall]:
        """Admit one call (`method`, `size` bytes of the request) as a request of its own:
        `check` runs at the admission step's body check; whatever the block raises is the
        call's outcome, recorded on its own row when the block ends."""
        ...


class Endpoint(Protocol):
    @property
    def dialect(self) -> Dialect:
        """How this endpoint's errors are spelled."""
        ...

    @property
    def reads_body(self) -> bool:
        """Whether the admission step reads the body (under its cap) for `check`."""
        ...

    @property
    def prompt_param(self) -> str | None:
        """The field a request's prompt is in (None: it holds none); a body far larger than any
        prompt a model here can read is refused, naming it, before it is parsed."""
        ...

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        """Parse, validate and normalize the request; raise `ApiError` to refuse it."""
        ...

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse: ...


class BatchEndpoint(ABC):
    """An endpoint whose request holds several calls, each admitted, served and recorded alone.

    `check` reads only the envelope (the admission step spends no quota or rate on it);
    `serve` gets `context.calls` to admit each call.
    """

    reads_body = True
    prompt_param: str | None = None  # a batch is bounded by its size and its number of calls

    @property
    @abstractmethod
    def dialect(self) -> Dialect: ...

    @abstractmethod
    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared: ...

    @abstractmethod
    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse: ...


@dataclass(frozen=True)
class Route:
    """One API path: the methods it answers and the endpoint behind it."""

    path: str  # canonical: what audit rows and metrics call it
    method: str
    endpoint: Endpoint
    aliases: tuple[str, ...] = ()  # the same route under other paths (e.g. without /v1)
    api: str = ""  # what a key's scope calls it (`proxy.routes.APIS`); "": no scope applies
