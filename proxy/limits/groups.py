"""Groups at run time: each of a caller's groups' token budgets, exact across every proxy process,
and the group a caller's turns at the model are taken with (`proxy.upstream.fairqueue`).

A group's budgets (tokens per minute, day, ISO week and month, calendar periods in the group's
time zone) are kept in Postgres by migration 0018's functions: before a member's request may run,
`llama_gate_group_reserve` charges every budget of every group of the member what the request can
cost (its measured prompt and its answer's room, lowered to what the budgets have left) or refuses
it, under each group's lock; when the request ends, `llama_gate_group_settle` moves the charge to
what it really cost. Requests running at once through any number of processes therefore never
spend more than a budget between them.

Only members of a group with a budget pay for this (one call to reserve; settling is batched off
the request's path). Who is in which group is read at start and again whenever groups or members
change (a NOTIFY on `llama_gate_groups`), and every 30 s in case a notification was lost.
While Postgres is unreachable, budgets are not checked (requests are let through and logged once):
the ledger still counts what they cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from proxy.audit.row import AuditRow
from proxy.auth.cache import Principal
from proxy.db import groups as queries
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import GroupBudgetReached, RequestTooLarge
from proxy.limits.ratelimit import format_duration

log = logging.getLogger(__name__)

RELOAD_SECONDS = 30.0  # members are read again at least this often (a lost notification)
SETTLE_BATCH = 500


class GroupBudgets:
    def __init__(self, database: Database, clock: Callable[[], datetime] | None = None) -> None:
        self._db = database
        self._clock = clock  # None: Postgres's own clock decides the period
        self._members = queries.Membership({}, frozenset())
        self._charged: set[str] = set()  # request ids charged and not yet settled
        self._costs: dict[str, int] = {}  # finished: what each really cost, to settle
        self._wake = asyncio.Event()
        self._reload = asyncio.Event()
        self._degraded = False

    def applies(self, principal: Principal) -> bool:
        """Whether the caller is in a group that has a token budget."""
        return principal.user_id in self._members.budgeted

    def team_of(self, principal: Principal) -> int | None:
        """The group the caller's turns are taken with (their first); None: in no group."""
        return self._members.teams.get(principal.user_id)

    def heard(self, _payload: str) -> None:
        """A group or its members changed: read the members again."""
        self._reload.set()

    async def load(self) -> None:
        self._members = await self._db.run(queries.memberships)

    async def reserve(
        self, principal: Principal, request_id: str, prompt: int | None, answer: int
    ) -> tuple[int, dict[str, str]]:
        """Charge the caller's groups what the request can cost; the answer's room left to it
        and the tightest budget's `x-ratelimit-*-tokens` headers. `GroupBudgetReached` when a
        budget has no room for its prompt and one answer token, `RequestTooLarge` when a budget
        never could."""
        if not self.applies(principal):
            return answer, {}
        now = self._clock() if self._clock is not None else None
        try:
            charge = await self._db.run(
                lambda con: queries.reserve(
                    con, principal.user_id, request_id, prompt or 0, answer, now
                )
            )
        except DatabaseUnavailable:
            if not self._degraded:
                self._degraded = True
                log.warning("group budgets are not checked until Postgres returns")
            return answer, {}
        self._degraded = False
        if charge.group is None:  # no longer in a group with a budget
            return answer, {}
        assert charge.budget is not None
        assert charge.used is not None
        assert charge.period is not None
        assert charge.resets_at is not None
        reset_ms = _ms_until(charge.resets_at, now)
        remaining = max(0, charge.budget - charge.used)
        headers = {
            "x-ratelimit-limit-tokens": str(charge.budget),
            "x-ratelimit-remaining-tokens": str(remaining),
            "x-ratelimit-reset-tokens": format_duration(reset_ms),
        }
        if charge.too_large:
            raise RequestTooLarge(
                f"This request needs more tokens (its prompt is {prompt or 0}) than group "
                f"{charge.group!r}'s budget of {charge.budget} tokens per {charge.period} allows "
                "at all; send a shorter prompt, or ask your administrator for a larger budget.",
                "messages",
            )
        if charge.refused:
            raise GroupBudgetReached(
                charge.group,
                charge.period,
                charge.used,
                charge.budget,
                charge.resets_at.astimezone(UTC).isoformat(timespec="seconds"),
                reset_ms,
                {**headers, "x-ratelimit-remaining-tokens": "0"},
            )
        self._charged.add(request_id)
        return charge.granted, headers

    async def extend(self, principal: Principal, request_id: str, tokens: int) -> None:
        """Charge `tokens` more to a request that asks the model again (a tool loop's next turn,
        a continued conversation); `GroupBudgetReached` when they do not fit."""
        if tokens > 0 and self.applies(principal):
            await self.reserve(principal, request_id, tokens, 0)

    def observe(self, row: AuditRow) -> None:
        """Completion hook: a charged request ended; settle what it really cost."""
        if row.request_id is None or row.request_id not in self._charged:
            return
        self._charged.discard(row.request_id)
        self._costs[row.request_id] = (row.prompt_tokens or 0) + (row.completion_tokens or 0)
        self._wake.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Members read before the first request; settling and re-reading for the app's life."""
        try:
            await self.load()
        except DatabaseUnavailable:
            log.warning("group members cannot be read yet: budgets apply once Postgres answers")
        task = asyncio.create_task(self._work())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._settle()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        next_load = loop.time() + RELOAD_SECONDS
        while True:
            wake = asyncio.ensure_future(self._wake.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            try:
                await asyncio.wait(
                    (wake, reload),
                    # costs left by an outage are tried again every second
                    timeout=1.0 if self._costs else max(0.0, next_load - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                wake.cancel()
                reload.cancel()
            if self._reload.is_set() or loop.time() >= next_load:
                self._reload.clear()
                next_load = loop.time() + RELOAD_SECONDS
                with contextlib.suppress(DatabaseUnavailable):
                    await self.load()
            if self._wake.is_set() or self._costs:
                self._wake.clear()
                await self._settle()

    async def _settle(self) -> None:
        """Settle what finished, in batches (requests ending together: one call)."""
        while self._costs:
            batch = dict(list(self._costs.items())[:SETTLE_BATCH])
            for request_id in batch:
                del self._costs[request_id]
            try:
                await self._db.run(functools.partial(queries.settle, costs=batch))
            except DatabaseUnavailable:
                self._costs.update(batch)  # settled once Postgres returns
                return


def _ms_until(moment: datetime, now: datetime | None) -> int:
    delta = moment - (now if now is not None else datetime.now(UTC))
    return max(0, int(delta.total_seconds() * 1000))
