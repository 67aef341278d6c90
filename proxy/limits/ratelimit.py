"""Sliding-window rate limits of users, keys and groups, never over across every proxy process
sharing the database, and exact for a lone one.

Decisions are made by `llama_gate_lease` (migration 0019; `llama_gate_lease_subject` for a key's
or a group's own limit, `Subject`, asked after the user's: a request refused there has spent its
place in the user's window), which serialises one holder's decisions under an advisory lock.
A user's requests that arrive while this process is already asking for that user wait and are
then decided together in one call (group commit). A user asking again soon is leased a few
places more (`proxy.limits.leases`), admitted here without a round trip until the lease ends,
then given back with the time of each admission made in it: in steady state a busy user costs
one call to Postgres per lease, not one per request. While Postgres is unreachable the limits are
enforced from this process's own window, which also holds every admission made while Postgres was
up, so an outage never lifts a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from proxy.auth.cache import Principal
from proxy.db import limits
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import ApiError, InvalidApiKey, RateLimited
from proxy.limits.leases import Lease, clock, lease_ms
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
SWEEP_SLACK = 0.05  # seconds after a lease ends before it is given back


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
        self._leases: dict[_Key, Lease] = {}  # each key's last decision, with its lease
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

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
        holder, limit, window = key
        lease = self._leases.get(key)
        if lease is not None and key not in self._waiting:  # no round trip while a lease lasts
            taken = lease.take(clock())
            if taken is not None:
                self._local.add(holder, window)
                return _headers(limit, taken)
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
        """Decide every request waiting for this user, in rounds, until none is left: those
        the lease a round brought can admit first, the rest in the next round."""
        waiters: list[asyncio.Future[Admission]] = []
        try:
            while waiters := [d for d in self._waiting.get(key, ()) if not d.done()]:
                self._waiting[key] = []  # who arrives now waits for the next round
                lease = self._leases.get(key)
                now = clock()
                while lease is not None and waiters and (taken := lease.take(now)) is not None:
                    self._local.add(key[0], key[2])
                    waiters.pop(0).set_result(taken)
                if waiters:
                    admissions = await self._round(key, len(waiters))
                    for decision, admission in zip(waiters, admissions, strict=True):
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

    async def _round(self, key: _Key, count: int) -> list[Admission]:
        """One call to Postgres: this key's previous lease given back, `count` requests
        decided, and maybe a new lease."""
        holder, limit, window = key
        ttl_ms = lease_ms(window)
        previous = self._leases.pop(key, None)
        sent, sent_wall = clock(), time.time()
        extra = previous.next_extra(sent) if previous is not None and ttl_ms else 0
        given_back = previous.given_back() if previous is not None else None
        try:
            grant = await self._db.run(
                lambda con: limits.lease(
                    con, holder, limit, window * 1000, count, extra, ttl_ms, given_back
                )
            )
        except asyncpg.ForeignKeyViolationError:
            # The user was deleted a moment ago and their key is still cached here; the
            # notification that evicts it is on its way. They are no user any more: 401.
            raise InvalidApiKey() from None
        except DatabaseUnavailable:
            self._restore(key, previous)
            if not self._degraded:
                self._degraded = True
                log.warning("rate limits are enforced per process until Postgres returns")
            return [self._local.try_acquire(holder, limit, window) for _ in range(count)]
        except BaseException:
            self._restore(key, previous)
            raise
        self._degraded = False
        lease = Lease.of(grant, sent, sent_wall, clock(), ttl_ms)
        self._keep(key, lease)
        for _ in range(grant.granted):
            self._local.add(holder, window)  # so an outage starts from what we admitted
        return [
            lease.admitted(index)
            if index < grant.granted
            else Admission(False, 0, grant.reset_ms, grant.retry_after_ms)
            for index in range(count)
        ]

    def _restore(self, key: _Key, previous: Lease | None) -> None:
        """A call that failed gave nothing back: the previous lease stays to be given back
        (by the sweeper, or with the next call), its unused places no longer taken."""
        if previous is not None and key not in self._leases:
            previous.left = 0
            self._keep(key, previous)

    def _keep(self, key: _Key, lease: Lease) -> None:
        if len(self._leases) > MAX_SPENT:  # a bound: a lease forgotten only holds places
            self._leases.clear()
        self._leases[key] = lease
        if not self._closed and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Give back each lease once it is over (while no round for its key is under way), so
        other processes see exactly what was admitted; forget the rest. A lease stays where a
        round finds it until its give-back is done: a round for its key meanwhile gives it back
        itself, in the call that decides (a second give-back changes nothing)."""
        while self._leases:
            wake = min(lease.until for lease in self._leases.values())
            await asyncio.sleep(max(wake - clock(), 0) + SWEEP_SLACK)
            for key in list(self._leases):
                lease = self._leases.get(key)
                if lease is None or lease.until > clock() or key in self._waiting:
                    continue
                await self._give_back(key, lease)
                if self._leases.get(key) is lease:
                    del self._leases[key]

    async def _give_back(self, key: _Key, lease: Lease) -> None:
        given_back = lease.given_back()
        if given_back is None:
            return
        holder, limit, window = key
        try:
            await self._db.run(
                lambda con: limits.lease(con, holder, limit, window * 1000, 0, 0, 0, given_back)
            )
        except Exception as exc:  # whatever it is, the other leases go on
            # Its rows stay, stamped at the lease's end: they leave the window a moment late.
            log.info("a rate-limit lease was not given back: %s", exc)

    async def close(self, wait: float = 2.0) -> None:
        """Give back every lease, once the rounds under way have ended (for at most `wait`
        seconds): a stop. What cannot be given back leaves the window only late."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()  # a lease it was giving back is still in _leases
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._deciders:
            await asyncio.wait(self._deciders, timeout=wait)
        leases, self._leases = self._leases, {}
        for key, lease in leases.items():
            await self._give_back(key, lease)


def _headers(limit: int, admission: Admission) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(admission.remaining),
        "x-ratelimit-reset-requests": format_duration(admission.reset_ms),
    }
