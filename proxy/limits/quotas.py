"""Per-user token quotas: tokens (prompt + completion, times the model's weight) per UTC day and
per rolling minute.

The count is what the audit log holds: `llama_requests` rows of the user, streamed ones included,
each counted in the day and minute its request began. Users without a quota cost nothing here.
For a user with one, a process asks Postgres at most every `cache_seconds` (one index range scan,
see `usage.user_tokens`), and meanwhile adds the requests it finished itself whose rows are not
in the database yet (the audit writer batches them, so they arrive within about a second). So
this process's own use counts at once, and other processes' use within `cache_seconds` plus the
audit delay. A request is refused only on figures re-read just before.

A request is admitted only if what it can cost fits what is left: its prompt, measured before
its turn (`proxy.limits.prompts`), plus its answer's room. That cost is reserved from admission
until its row is counted, so requests running at once cannot together overshoot in this process;
an answer's room is lowered to what the quota has left (and the backend is asked for no more), and
a prompt that does not fit what is left is refused (429), or, when it is larger than the quota
itself, refused for good (400: no wait would help). A request that could not be measured (a
backend that cannot count) reserves its answer's room only. While Postgres is unreachable the
last figures plus this process's own use decide.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from proxy.audit.row import AuditRow
from proxy.auth.cache import Principal
from proxy.db import usage
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.db.usage import TokenTotals
from proxy.errors import RequestTooLarge, TokenQuotaExceeded
from proxy.limits.ratelimit import format_duration
from proxy.limits.weights import weighted

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0
RECHECK_SECONDS = 0.25  # before refusing, figures older than this are read again
MINUTE = timedelta(seconds=60)
FORGOTTEN = timedelta(hours=1)  # a reservation whose row never came is dropped after this
_NOTHING = TokenTotals(0, 0, None, frozenset())


@dataclass(frozen=True)
class _Use:
    request_id: str
    started_at: datetime
    tokens: int


@dataclass(eq=False)
class _Ledger:
    """One user's figures: the database's, plus uses finished here that it may not show yet."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    totals: TokenTotals = _NOTHING
    read_at: float | None = None  # monotonic
    read_day: date | None = None
    recent: list[_Use] = field(default_factory=list)
    pending: dict[str, _Use] = field(default_factory=dict)  # admitted, not yet finished


@dataclass(frozen=True)
class Reserved:
    """What the quota let through: its headers, and the answer's room left to the request."""

    headers: dict[str, str]
    answer: int


@dataclass(frozen=True)
class _Verdict:
    per: str  # "day" or "minute"
    limit: int
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def _day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class TokenQuotas:
    def __init__(
        self,
        database: Database,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = database
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._timer = timer
        self._ledgers: dict[int, _Ledger] = {}  # only users with a quota who sent requests
        self._degraded = False

    def observe(self, row: AuditRow) -> None:
        """Completion hook: count a finished request here until its audit row is readable.

        Requests are told apart by the proxy's own request id, never the client's X-Request-Id:
        a client that sent one id on many requests would otherwise have them all taken for the
        first one's row once it landed.
        """
        ledger = self._ledgers.get(row.user_id) if row.user_id is not None else None
        if ledger is None or row.request_id is None:
            return
        ledger.pending.pop(row.request_id, None)
        tokens = weighted((row.prompt_tokens or 0) + (row.completion_tokens or 0), row.weight)
        if tokens > 0:
            ledger.recent.append(_Use(row.request_id, row.created_at, tokens))

    @staticmethod
    def applies(principal: Principal) -> bool:
        """Whether `principal` has a token quota at all."""
        return principal.tokens_per_day is not None or principal.tokens_per_minute is not None

    async def reserve(
        self,
        principal: Principal,
        request_id: str,
        prompt: int | None,
        answer: int,
        weight: float = 1.0,
    ) -> Reserved:
        """Reserve what request `request_id` can cost (`prompt` tokens, measured, plus up to
        `answer`, times its model's `weight`), lowering the answer's room to what is left;
        `TokenQuotaExceeded` when not even the prompt and one answer token fit,
        `RequestTooLarge` when the quota never could.
        """
        if not self.applies(principal):
            return Reserved({}, answer)
        ledger = self._ledgers.setdefault(principal.user_id, _Ledger())
        need = weighted((prompt or 0) + (1 if answer else 0), weight)
        await self._refresh(principal.user_id, ledger, self._cache_seconds)
        verdicts = self._verdicts(principal, ledger)
        if any(v.remaining < max(need, 1) for v in verdicts):
            await self._refresh(principal.user_id, ledger, RECHECK_SECONDS)
            verdicts = self._verdicts(principal, ledger)
        for verdict in verdicts:
            if need > verdict.limit:
                raise RequestTooLarge(
                    f"This request needs {need} tokens (its prompt is {prompt or 0}), more than "
                    f"your quota of {verdict.limit} tokens per {verdict.per} allows at all; "
                    "send a shorter prompt, or ask your administrator for a larger quota.",
                    "messages",
                )
        short = [v for v in verdicts if v.remaining < max(need, 1)]
        if short:
            worst = max(short, key=lambda v: v.reset_ms)
            raise TokenQuotaExceeded(
                worst.per, worst.used, worst.limit, worst.reset_ms, _headers(worst)
            )
        left = min(v.remaining for v in verdicts)
        granted = min(answer, math.floor(left / weight) - (prompt or 0))
        cost = weighted((prompt or 0) + granted, weight)
        ledger.pending[request_id] = _Use(request_id, self._clock(), cost)
        verdicts = self._verdicts(principal, ledger)
        return Reserved(_headers(min(verdicts, key=lambda v: v.remaining)), granted)

    def extend(
        self, principal: Principal, request_id: str, tokens: int, weight: float = 1.0
    ) -> None:
        """Reserve `tokens` more for a request that asks the model again (a tool loop's next
        turn); `TokenQuotaExceeded` when they do not fit."""
        ledger = self._ledgers.get(principal.user_id)
        if ledger is None or not self.applies(principal):
            return
        tokens = weighted(tokens, weight)
        verdicts = self._verdicts(principal, ledger)
        short = [v for v in verdicts if v.remaining < tokens]
        if short:
            worst = max(short, key=lambda v: v.reset_ms)
            raise TokenQuotaExceeded(
                worst.per, worst.used, worst.limit, worst.reset_ms, _headers(worst)
            )
        held = ledger.pending.get(request_id)
        started = held.started_at if held is not None else self._clock()
        cost = (held.tokens if held is not None else 0) + tokens
        ledger.pending[request_id] = _Use(request_id, started, cost)

    async def _refresh(self, user_id: int, ledger: _Ledger, max_age: float) -> None:
        async with ledger.lock:  # one read at a time, so an older answer never replaces a newer
            now = self._clock()
            day_start = _day_start(now)
            if not self._stale(ledger, now, max_age):
                return
            recent = list(ledger.recent)
            since = min((u.started_at for u in recent), default=now)
            try:
                ids = [u.request_id for u in recent]
                totals = await self._db.run(
                    lambda con: usage.user_tokens(con, user_id, day_start, now - MINUTE, ids, since)
                )
            except DatabaseUnavailable:
                if not self._degraded:
                    self._degraded = True
                    log.warning("token quotas use the last known figures until Postgres returns")
                return
            self._degraded = False
            ledger.totals, ledger.read_at, ledger.read_day = totals, self._timer(), now.date()
            # Uses now in the database are in `totals`; uses past both windows count nowhere.
            horizon = min(day_start, now - MINUTE)
            ledger.recent = [
                u
                for u in ledger.recent
                if u.request_id not in totals.seen and u.started_at >= horizon
            ]

    def _stale(self, ledger: _Ledger, now: datetime, max_age: float) -> bool:
        if ledger.read_at is None or self._timer() - ledger.read_at > max_age:
            return True
        if ledger.read_day != now.astimezone(UTC).date():
            return True  # a new day: yesterday's total no longer counts
        oldest = ledger.totals.minute_oldest
        return oldest is not None and oldest <= now - MINUTE  # the minute's total went down

    def _verdicts(self, principal: Principal, ledger: _Ledger) -> list[_Verdict]:
        now = self._clock()
        for request_id, use in list(ledger.pending.items()):
            if use.started_at < now - FORGOTTEN:
                del ledger.pending[request_id]
        reserved = sum(use.tokens for use in ledger.pending.values())
        verdicts = []
        if principal.tokens_per_day is not None:
            day_start = _day_start(now)
            used = (
                reserved
                + ledger.totals.day
                + sum(u.tokens for u in ledger.recent if u.started_at >= day_start)
            )
            reset = day_start + timedelta(days=1) - now if used else timedelta(0)
            verdicts.append(_Verdict("day", principal.tokens_per_day, used, _ms(reset)))
        if principal.tokens_per_minute is not None:
            window = [u for u in ledger.recent if u.started_at > now - MINUTE]
            used = reserved + ledger.totals.minute + sum(u.tokens for u in window)
            starts = [u.started_at for u in (*window, *ledger.pending.values())]
            if ledger.totals.minute_oldest is not None:
                starts.append(ledger.totals.minute_oldest)
            reset = min(starts) + MINUTE - now if starts else timedelta(0)
            verdicts.append(_Verdict("minute", principal.tokens_per_minute, used, _ms(reset)))
        return verdicts


def _ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))


def _headers(verdict: _Verdict) -> dict[str, str]:
    """OpenAI's token headers, for whichever quota has the fewest tokens left."""
    return {
        "x-ratelimit-limit-tokens": str(verdict.limit),
        "x-ratelimit-remaining-tokens": str(verdict.remaining),
        "x-ratelimit-reset-tokens": format_duration(verdict.reset_ms),
    }
