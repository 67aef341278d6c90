"""Budgets and groups at run time: groups' and keys' token budgets, exact across every proxy
process; who is in which group (for groups' limits and for turns at the model); model weights.

A budget (a group's: tokens per minute, day, ISO week and month, calendar periods in the group's
time zone; a key's: the same in UTC) is kept in Postgres by migration 0018's functions: before a
request may run, `llama_gate_budget_reserve` charges every budget that applies (each of the
user's groups', its key's) what the request can cost (its measured prompt and its answer's room,
lowered to what the budgets have left, times its model's weight) or refuses it, under each
holder's lock; when the request ends, `llama_gate_budget_settle` moves the charge to what it
really cost. Requests running at once through any number of processes therefore never spend
more than a budget between them.

Only requests a budget applies to pay for this (one call to reserve; settling is batched off the
request's path). Who is in which group, and the models' weights, are read at start and again
whenever they change (a NOTIFY on `llama_gate_groups`), and every 30 s in case a notification
was lost. While Postgres is unreachable, budgets are not checked (requests are let through and
that is logged once): the ledger still counts what they cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg

from proxy.audit.row import AuditRow
from proxy.auth.cache import Principal
from proxy.background import background
from proxy.db import limits as limits_sql
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import BudgetReached, RequestTooLarge
from proxy.limits.ratelimit import format_duration
from proxy.limits.weights import weighted
from proxy.upstream.backends import GroupCap

log = logging.getLogger(__name__)

RELOAD_SECONDS = 30.0  # members and weights are read again at least this often
SETTLE_BATCH = 500


class Budgets:
    def __init__(
        self,
        database: Database,
        default_model: Callable[[], str | None] = lambda: None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._db = database
        self._default_model = default_model
        self._clock = clock  # None: Postgres's own clock decides the period
        self._members = limits_sql.Membership({}, frozenset(), {})
        self._weights: dict[str, float] = {}
        self._charged: set[str] = set()  # request ids charged and not yet settled
        self._costs: dict[str, int] = {}  # finished: what each really cost, to settle
        self._wake = asyncio.Event()
        self._reload = asyncio.Event()
        self._degraded = False
        self._next_load = 0.0  # loop time of the next re-read (kept across failed rounds)

    def applies(self, principal: Principal) -> bool:
        """Whether a token budget applies to the caller: their key's, or a group's."""
        return principal.key_budgeted or principal.user_id in self._members.budgeted

    def team_of(self, principal: Principal) -> int | None:
        """The group the caller's turns are taken with (their first); None: in no group."""
        return self._members.teams.get(principal.user_id)

    def group_limits(self, principal: Principal) -> tuple[limits_sql.GroupLimit, ...]:
        """The caller's groups that have a request limit or a cap on requests at once."""
        return self._members.limits.get(principal.user_id, ())

    def group_caps(self, principal: Principal) -> list[GroupCap]:
        """The caller's groups' caps on their members' requests at once."""
        return [
            GroupCap(group.group_id, group.max_concurrent, group.name)
            for group in self.group_limits(principal)
            if group.max_concurrent is not None
        ]

    def weight_of(self, model: str | None) -> float:
        """What a token of `model` (None: the default model) counts for (1 unless set)."""
        name = model if model is not None else self._default_model()
        return self._weights.get(name, 1.0) if name is not None else 1.0

    def heard(self, _payload: str) -> None:
        """Groups, members or weights changed: read them again."""
        self._reload.set()

    async def load(self) -> None:
        self._members = await self._db.run(limits_sql.memberships)
        self._weights = await self._db.run(limits_sql.model_weights)

    async def reserve(
        self,
        principal: Principal,
        request_id: str,
        prompt: int | None,
        answer: int,
        weight: float = 1.0,
    ) -> tuple[int, dict[str, str]]:
        """Charge every budget that applies what the request can cost; the answer's room left
        to it and the tightest budget's `x-ratelimit-*-tokens` headers. `BudgetReached` when a
        budget has no room for its prompt and one answer token, `RequestTooLarge` when a budget
        never could."""
        if not self.applies(principal):
            return answer, {}
        now = self._clock() if self._clock is not None else None
        # Counted as charged before asking: Postgres may commit the charge and the answer still
        # be lost (a timeout, the client leaving); its row then settles it all the same, and
        # settling a request never charged changes nothing.
        self._charged.add(request_id)
        try:
            charge = await self._db.run(
                lambda con: limits_sql.reserve(
                    con,
                    principal.user_id,
                    principal.key_id,
                    request_id,
                    prompt or 0,
                    answer,
                    weight,
                    now,
                )
            )
        except DatabaseUnavailable:
            if not self._degraded:
                self._degraded = True
                log.warning("group and key budgets are not checked until Postgres returns")
            return answer, {}
        self._degraded = False
        if charge.holder is None:  # no budget applies any more
            return answer, {}
        assert charge.budget is not None
        assert charge.used is not None
        assert charge.period is not None
        assert charge.resets_at is not None
        reset_ms = _ms_until(charge.resets_at, now)
        headers = {
            "x-ratelimit-limit-tokens": str(charge.budget),
            "x-ratelimit-remaining-tokens": str(max(0, charge.budget - charge.used)),
            "x-ratelimit-reset-tokens": format_duration(reset_ms),
        }
        if charge.too_large:
            raise RequestTooLarge(
                f"This request needs more tokens (its prompt is {prompt or 0}) than the budget "
                f"of {charge.holder}, {charge.budget} tokens per {charge.period}, allows at "
                "all; send a shorter prompt, or ask your administrator for a larger budget.",
                "messages",
            )
        if charge.refused:
            raise BudgetReached(
                charge.holder,
                charge.period,
                charge.used,
                charge.budget,
                charge.resets_at.astimezone(UTC).isoformat(timespec="seconds"),
                reset_ms,
                {**headers, "x-ratelimit-remaining-tokens": "0"},
            )
        return charge.granted, headers

    async def extend(
        self, principal: Principal, request_id: str, tokens: int, weight: float = 1.0
    ) -> None:
        """Charge `tokens` more to a request that asks the model again (a tool loop's next turn,
        a continued conversation); `BudgetReached` when they do not fit."""
        if tokens > 0 and self.applies(principal):
            await self.reserve(principal, request_id, tokens, 0, weight)

    def observe(self, row: AuditRow) -> None:
        """Completion hook: a charged request ended; settle what it really cost."""
        if row.request_id is None or row.request_id not in self._charged:
            return
        self._charged.discard(row.request_id)
        tokens = (row.prompt_tokens or 0) + (row.completion_tokens or 0)
        self._costs[row.request_id] = weighted(tokens, row.weight)
        self._wake.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Members read before the first request; settling and re-reading for the app's life."""
        try:
            await self.load()
        except DatabaseUnavailable:
            log.warning("groups cannot be read yet: their limits apply once Postgres answers")
        try:
            async with background(self._work()):
                yield
        finally:
            await self._settle()

    async def _work(self) -> None:
        """Settle and re-read for the app's life: a failed round (a deadlock between processes
        settling the same budgets) is logged and tried again, never the end of settling, which
        would keep every later request's reservation until its period ended."""
        loop = asyncio.get_running_loop()
        self._next_load = loop.time() + RELOAD_SECONDS
        while True:
            try:
                await self._rounds()
            except Exception:
                log.exception("settling budgets failed; trying again in a second")
                await asyncio.sleep(1.0)

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wake = asyncio.ensure_future(self._wake.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            try:
                await asyncio.wait(
                    (wake, reload),
                    # costs left by an outage are tried again every second
                    timeout=1.0 if self._costs else max(0.0, self._next_load - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                wake.cancel()
                reload.cancel()
            if self._reload.is_set() or loop.time() >= self._next_load:
                self._reload.clear()
                self._next_load = loop.time() + RELOAD_SECONDS
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
                await self._db.run(functools.partial(limits_sql.settle, costs=batch))
            except DatabaseUnavailable:
                self._costs.update(batch)  # settled once Postgres returns
                return
            except asyncpg.TransactionRollbackError:  # a deadlock, a serialization failure
                self._costs.update(batch)  # passing: nothing of it is lost, tried again
                raise
            except asyncio.CancelledError:
                self._costs.update(batch)  # settled by the last settle as the app stops
                raise
            except Exception:
                # Refused for good (it would be refused again each second and hold up every
                # cost after it): these requests keep what they reserved until their periods
                # end, and the rest go on being settled.
                log.exception("cannot settle %d budget charges; they stay reserved", len(batch))


def _ms_until(moment: datetime, now: datetime | None) -> int:
    delta = moment - (now if now is not None else datetime.now(UTC))
    return max(0, int(delta.total_seconds() * 1000))
