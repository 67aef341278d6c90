"""The one admission step: what a request must pass, in order, before it may wait for a backend.

1. a concurrency place, taken atomically and first (`proxy.limits.places`), and a look at
   whether the user's rate limit is already known to be spent (then a 429 before the body is
   even read);
2. its body, read under the size cap (one far larger than any prompt a model here can read is
   refused before it is parsed) and checked by the route (a 400 here spends nothing else); a
   large body is parsed at its turn (`proxy.lane`), so that it stalls nobody's stream;
3. its prompt, measured when that can matter (`proxy.limits.prompts`): one that does not fit
   the model's context is a 400 here;
4. the user's token quota, then the budgets of their groups and of their key
   (`proxy.limits.budgets`), asked with what the request can cost (its prompt and its answer's
   room, times its model's weight), which stays reserved until the request ends;
5. the user's rate limit, then their key's and their groups' (`Subject`).

Groups' caps on their members' requests at once are places too, taken with the user's.

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
from proxy.lane import Lane
from proxy.limits.body import read_body
from proxy.limits.budgets import Budgets
from proxy.limits.places import Places
from proxy.limits.prompts import Ask, Prompts
from proxy.limits.quotas import TokenQuotas
from proxy.limits.ratelimit import RateLimiter, Subject
from proxy.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Admitted(Generic[T]):
    checked: T  # what the route's check made of the body
    headers: dict[str, str]  # x-ratelimit-* for the answer
    prompt_tokens: int | None = None  # measured before the turn (None: not measured)
    answer: int | None = None  # the tokens its answer may have in all (None: as the call asks)
    weight: float | None = None  # its model's weight against budgets and quotas (None: not asked)


class Admission:
    def __init__(
        self,
        settings: Settings,
        places: Places,
        quotas: TokenQuotas,
        budgets: Budgets,
        rate_limiter: RateLimiter,
        prompts: Prompts,
    ) -> None:
        self._max_body = settings.max_body_bytes
        self._body_timeout = float(settings.body_timeout_seconds)
        self._max_concurrent = settings.max_concurrent
        self._hard_cap = settings.max_tokens_hard_cap
        self.places = places
        self._quotas = quotas
        self.budgets = budgets
        self.group_places = Places()  # groups' caps on their members' requests at once
        self._rate = rate_limiter
        self.prompts = prompts
        self.lane = Lane()

    def max_tokens(self, caller: Principal) -> int:
        """The caller's cap on one answer: their own, never above MAX_TOKENS_HARD_CAP."""
        return min(caller.max_tokens or self._hard_cap, self._hard_cap)

    def max_concurrent(self, caller: Principal) -> int:
        """How many of the caller's requests may be in flight or queued at once."""
        return caller.max_concurrent or self._max_concurrent

    def limits_of(self, caller: Principal) -> dict[str, int | None]:
        """The limits that apply to the caller, theirs or the defaults (what `GET /v1/me` shows)."""
        requests, window = self._rate.limits_for(caller)
        return {
            "requests_per_window": requests,
            "window_seconds": window,
            "max_concurrent": self.max_concurrent(caller),
            "max_tokens": self.max_tokens(caller),
            "tokens_per_day": caller.tokens_per_day,
            "tokens_per_minute": caller.tokens_per_minute,
        }

    @asynccontextmanager
    async def hold(
        self,
        request: web.Request,
        caller: Principal,
        received: Callable[[int], None],
        check: Callable[[bytes | None], T],
        *,
        request_id: str,
        asks: Callable[[T], Ask | None],
        read_body_first: bool,
        spend: bool = True,
        prompt_param: str | None = None,
    ) -> AsyncIterator[Admitted[T]]:
        """Hold the caller's place for as long as this is entered; raise `ApiError` to refuse.

        `asks` says what the checked request will ask of the model (None: nothing). Without
        `spend` nothing is measured and the quota and the rate limit are not asked: a batch's
        envelope, whose calls are each admitted (and so counted) alone. `prompt_param` names the
        field a body's prompt is in, for a body too large for any prompt (None: not bounded).
        """
        self.places.take(caller.user_id, self.max_concurrent(caller))
        taken: list[int] = []
        try:
            for group in self.budgets.group_limits(caller):
                if group.max_concurrent is not None:
                    self.group_places.take(
                        group.group_id, group.max_concurrent, f"group {group.name!r}"
                    )
                    taken.append(group.group_id)
            others = self._subjects(caller)
            if spend:
                self._rate.refuse_if_spent(caller, others)
            raw = (
                await read_body(request, self._max_body, self._body_timeout, received, self.lane)
                if read_body_first
                else None
            )
            if raw is not None and prompt_param is not None:
                self.prompts.refuse_oversized(len(raw), prompt_param)
            size = len(raw) if raw is not None else 0
            checked = await self.lane.step(size, lambda: check(raw))
            if not spend:
                yield Admitted(checked, {})
                return
            ask = asks(checked)
            prompt, answer = None, None
            weight = self.budgets.weight_of(ask.model if ask is not None else None)
            if ask is not None:
                has_quota = self._quotas.applies(caller) or self.budgets.applies(caller)
                call = ask.call
                await self.lane.step(size, lambda: call.data)  # once: measured, then forwarded
                measured = await self.prompts.measure(ask, request_id, has_quota, size)
                prompt, answer = measured.prompt_tokens, measured.answer
            headers: dict[str, str] = {}
            if ask is None or ask.charged:  # counting a prompt reads nothing: no quota
                charged = ask is not None
                reserved = await self._quotas.reserve(
                    caller,
                    request_id,
                    prompt if charged else None,
                    (answer or 0) if charged else 0,
                    weight,
                )
                answer = reserved.answer if charged else answer
                headers = reserved.headers
                if charged:
                    answer, budget_headers = await self.budgets.reserve(
                        caller, request_id, prompt, answer or 0, weight
                    )
                    headers = _fewest_left(headers, budget_headers)
            rate_headers = await self._rate.allow(caller, others)
            yield Admitted(checked, {**rate_headers, **headers}, prompt, answer, weight)
        finally:
            for group_id in taken:
                self.group_places.give_back(group_id)
            self.places.give_back(caller.user_id)

    def _subjects(self, caller: Principal) -> list[Subject]:
        """The request limits beyond the user's own: their key's, then their groups'."""
        subjects = []
        if caller.key_rate_limit is not None:
            window = caller.key_rate_window_seconds or self._rate.default_window
            subjects.append(
                Subject(
                    f"k:{caller.limits_key or caller.key_id}",
                    f"key {caller.key_id}",
                    caller.key_rate_limit,
                    window,
                )
            )
        for group in self.budgets.group_limits(caller):
            if group.rate_limit is not None:
                window = group.rate_window_seconds or self._rate.default_window
                whose = f"group {group.name!r}"
                subjects.append(Subject(f"g:{group.group_id}", whose, group.rate_limit, window))
        return subjects


def _fewest_left(*choices: dict[str, str]) -> dict[str, str]:
    """Of several budgets' token headers, those of the one with the fewest tokens left."""
    given = [c for c in choices if c]
    if not given:
        return {}
    return min(given, key=lambda c: int(c["x-ratelimit-remaining-tokens"]))
