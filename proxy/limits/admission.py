"""The one admission step: what a request must pass, in order, before it may wait for a backend.

1. a concurrency place, taken atomically and first (`proxy.limits.places`);
2. its body, read under the size cap and checked by the route (a 400 here spends nothing else);
3. the user's token quota;
4. the user's rate limit.

A request refused at one step spends nothing at the steps after it, and its place is given back
on every way out, the client leaving included. An admitted request keeps its place until it ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from proxy.auth.cache import Principal
from proxy.limits.body import read_body
from proxy.limits.places import Places
from proxy.limits.quotas import TokenQuotas
from proxy.limits.ratelimit import RateLimiter
from proxy.settings import Settings
from proxy.upstream.outcome import Outcome

T = TypeVar("T")


@dataclass(frozen=True)
class Admitted(Generic[T]):
    checked: T  # what the route's check made of the body
    headers: dict[str, str]  # x-ratelimit-* for the answer


class Admission:
    def __init__(
        self, settings: Settings, places: Places, quotas: TokenQuotas, rate_limiter: RateLimiter
    ) -> None:
        self._max_body = settings.max_body_bytes
        self._body_timeout = float(settings.body_timeout_seconds)
        self._max_concurrent = settings.max_concurrent
        self._hard_cap = settings.max_tokens_hard_cap
        self.places = places
        self._quotas = quotas
        self._rate = rate_limiter

    def max_tokens(self, caller: Principal) -> int:
        """The caller's cap on one answer: their own, never above MAX_TOKENS_HARD_CAP."""
        return min(caller.max_tokens or self._hard_cap, self._hard_cap)

    @asynccontextmanager
    async def admit(
        self,
        request: web.Request,
        caller: Principal,
        outcome: Outcome,
        check: Callable[[bytes | None], T],
        *,
        read_body_first: bool,
        spend: bool = True,
    ) -> AsyncIterator[Admitted[T]]:
        """Hold the caller's place for as long as this is entered; raise `ApiError` to refuse.

        Without `spend` the quota and the rate limit are not asked: a batch's envelope, whose
        calls are each admitted (and so counted) alone.
        """
        self.places.take(caller.user_id, caller.max_concurrent or self._max_concurrent)
        try:
            raw = (
                await read_body(request, self._max_body, self._body_timeout, outcome)
                if read_body_first
                else None
            )
            checked = check(raw)
            headers: dict[str, str] = {}
            if spend:
                token_headers = await self._quotas.admit(caller)
                rate_headers = await self._rate.admit(caller)
                headers = {**rate_headers, **token_headers}
            yield Admitted(checked, headers)
        finally:
            self.places.give_back(caller.user_id)
