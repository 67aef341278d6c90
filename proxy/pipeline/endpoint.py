"""What a route plugs into the pipeline: how its body is checked, how it is served, how it errs.

An API dialect (OpenAI's, Anthropic's, JSON-RPC, ...) provides `Endpoint`s; the route table
(`proxy.routes`) lists each path once with its endpoint. The pipeline does everything else the
same way for all of them: authentication, the admission step, the fair turn at a backend, the
outcome and the audit row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from proxy.auth.cache import Principal
from proxy.errors import ApiError
from proxy.upstream.affinity import Affinity
from proxy.upstream.delivery import Delivery
from proxy.upstream.forward import Reply, UpstreamCall


class Dialect(Protocol):
    """How an API spells its errors."""

    def error(self, exc: ApiError, request_id: str) -> web.Response: ...


@dataclass(frozen=True)
class CallerLimits:
    """What a route's check needs to know about the caller."""

    max_tokens: int  # the cap on one answer (the caller's own, never above the hard cap)


@dataclass(frozen=True)
class Prepared:
    """A checked request: what to ask the backend and how to answer the client."""

    call: UpstreamCall | None
    reply: Reply | None
    model: str | None = None
    stream: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the endpoint's serve needs
    end_user: str | None = None  # whom the client says the request is for, when it says
    affinity: Affinity | None = None  # the conversation it continues, to route it where it is warm


@dataclass
class Context:
    """What an endpoint's `serve` gets: the caller, the client side, and a turn at a backend."""

    caller: Principal
    delivery: Delivery
    request_id: str
    send: Callable[[UpstreamCall, Reply], Awaitable[web.StreamResponse]]


class Endpoint(Protocol):
    @property
    def dialect(self) -> Dialect:
        """How this endpoint's errors are spelled."""
        ...

    @property
    def reads_body(self) -> bool:
        """Whether the admission step reads the body (under its cap) for `check`."""
        ...

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        """Parse, validate and normalize the request; raise `ApiError` to refuse it."""
        ...

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse: ...


@dataclass(frozen=True)
class Route:
    """One API path: the methods it answers and the endpoint behind it."""

    path: str  # canonical: what audit rows and metrics call it
    method: str
    endpoint: Endpoint
    aliases: tuple[str, ...] = ()  # the same route under other paths (e.g. without /v1)
