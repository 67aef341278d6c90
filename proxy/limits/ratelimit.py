"""Sliding-window rate limits of users, keys and groups, exact across every proxy process sharing
the database.

Decisions are made by `llama_gate_admit` (migration 0002), which serialises one user's decisions
under an advisory lock, so N processes admit exactly LIMIT requests per window between them; a
key's or a group's own limit (`Subject`) likewise by `llama_gate_admit_subject` (migration 0018),
asked after the user's (a request refused there has spent its place in the user's window).
A user's requests that arrive while this process is already asking for that user wait and are
then decided together in one call (group commit): one user's burst costs a few round trips, not
one each under the lock (measured: 0.27x -> see README's benchmark table). While Postgres is
unreachable the limits are enforced from this process's own window, which also holds every
admission made while Postgres was up, so an outage never lifts a limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from proxy.auth.cache import Principal
from proxy.db import limits, queries
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.db.queries import Grant
from proxy.errors import ApiError, InvalidApiKey, RateLimited
from proxy.settings import Settings
from proxy.window import Admission, SlidingWindows

log = logging.getLogger(__name__)


def format_duration(ms: int) -> str:
    """OpenAI's spelling of a reset time: `250ms`, `1.5s`, `6m0s`."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


_Key = tuple[int | str, int, int]  # user id (or a Subject's), limit, window seconds
MAX_SPENT = 100_000  # users remembered as refused until a moment


@dataclass(frozen=True)
class Subject:
    """A limit beyond the user's own: their key's or a group's."""

    subject: str  # `k:<key id>` or `g:<group id>`
    whose: str  # for messages: "key lgk_...", "group 'x'"
    limit: int
    window_seconds: int


class RateLimiter:
    def __init__(self, settings: Settings, database: Database) -> None:
        self._default_limit = settings.rate_limit
        self.default_window = settings.rate_window_seconds
        self._db = database
        self._local: SlidingWindows[int | str] = SlidingWindows()
        self._degraded = False
        self._waiting: dict[_Key, list[asyncio.Future[Admission]]] = {}
        self._deciders: set[asyncio.Task[None]] = set()
        self._spent: dict[_Key, float] = {}  # refused until (monotonic)

    def limits_for(self, principal: Principal) -> tuple[int, int]:
        return (
            principal.rate_limit or self._default_limit,
            principal.rate_window_seconds or self.default_window,
        )

    def refuse_if_spent(self, principal: Principal, others: Sequence[Subject] = ()) -> None:
        """`RateLimited` at once when a decision already said no request of this user (or of
        one of `others`) can be admitted yet; nothing is spent either way."""
        limit, window = self.limits_for(principal)
        self._refuse_if_spent((principal.user_id, limit, window), None)
        for other in others:
            self._refuse_if_spent((other.subject, other.limit, other.window_seconds), other.whose)

    def _refuse_if_spent(self, key: _Key, whose: str | None) -> None:
        until = self._spent.get(key)
        if until is None:
            return
        left_ms = int((until - time.monotonic()) * 1000)
        if left_ms <= 0:
            del self._spent[key]
            return
        admission = Admission(False, 0, left_ms, left_ms)
        _, limit, window = key
        raise RateLimited(limit, window, left_ms, _headers(limit, admission), whose)

    async def allow(self, principal: Principal, others: Sequence[Subject] = ()) -> dict[str, str]:
        """Admit one request against the user's limit, then each of `others`; the headers of
        the one with the fewest requests left, or `RateLimited` naming the one reached."""
        limit, window = self.limits_for(principal)
        chosen = await self._allow((principal.user_id, limit, window), None)
        for other in others:
            headers = await self._allow(
                (other.subject, other.limit, other.window_seconds), other.whose
            )
            left = int(headers["x-ratelimit-remaining-requests"])
            if left < int(chosen["x-ratelimit-remaining-requests"]):
                chosen = headers
        return chosen

    async def _allow(self, key: _Key, whose: str | None) -> dict[str, str]:
        _, limit, window = key
        decision: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(key)
        if waiting is None:  # nobody is asking for this user now: ask, for everyone who comes
            self._waiting[key] = [decision]
            task = asyncio.create_task(self._decide(key))
            self._deciders.add(task)
            task.add_done_callback(self._deciders.discard)
        else:
            waiting.append(decision)
        admission = await decision
        headers = _headers(limit, admission)
        if not admission.admitted:
            if len(self._spent) > MAX_SPENT:  # a bound, whatever the number of users
                self._spent.clear()
            self._spent[key] = time.monotonic() + admission.retry_after_ms / 1000
            raise RateLimited(limit, window, admission.retry_after_ms, headers, whose)
        return headers

    async def _decide(self, key: _Key) -> None:
        """Decide every request waiting for this user, in rounds, until none is left."""
        user, limit, window = key
        waiters: list[asyncio.Future[Admission]] = []
        try:
            while waiters := [d for d in self._waiting.get(key, ()) if not d.done()]:
                self._waiting[key] = []  # who arrives now waits for the next round
                for decision, admission in zip(
                    waiters, await self._round(user, limit, window, len(waiters)), strict=True
                ):
                    if not decision.done():
                        decision.set_result(admission)
        except BaseException as exc:  # a bug must not leave requests waiting for ever
            for decision in [*waiters, *self._waiting.get(key, ())]:
                if not decision.done():
                    decision.set_exception(exc)
            if not isinstance(exc, ApiError):  # an answer for the waiters, not a failure
                raise
        finally:
            self._waiting.pop(key, None)

    async def _round(self, user: int | str, limit: int, window: int, count: int) -> list[Admission]:
        try:
            if isinstance(user, str):
                row = await self._db.run(
                    lambda con: limits.admit_subject(con, user, limit, window * 1000, count)
                )
                grant = Grant(**dict(row))
            else:
                grant = await self._db.run(
                    lambda con: queries.admit_requests(con, user, limit, window * 1000, count)
                )
        except asyncpg.ForeignKeyViolationError:
            # The user was deleted a moment ago and their key is still cached here; the
            # notification that evicts it is on its way. They are no user any more: 401.
            raise InvalidApiKey() from None
        except DatabaseUnavailable:
            if not self._degraded:
                self._degraded = True
                log.warning("rate limits are enforced per process until Postgres returns")
            return [self._local.try_acquire(user, limit, window) for _ in range(count)]
        self._degraded = False
        for _ in range(grant.granted):
            self._local.add(user, window)  # so an outage starts from what we admitted
        return [
            Admission(True, grant.remaining + grant.granted - index - 1, grant.reset_ms, 0)
            if index < grant.granted
            else Admission(False, 0, grant.reset_ms, grant.retry_after_ms)
            for index in range(count)
        ]


def _headers(limit: int, admission: Admission) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(admission.remaining),
        "x-ratelimit-reset-requests": format_duration(admission.reset_ms),
    }
