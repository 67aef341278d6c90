"""Backend slots shared by several proxy processes: leases in Postgres, one fair order for all.

A lone proxy process hands out its backends' slots from memory (`proxy.upstream.backends`) and
this module costs it nothing. Once another process serves the same database (the presence beat,
`proxy.cluster.presence`, counts the live ones; `serve --workers N` starts its workers shared),
every request takes its turn here instead:

- it is queued as a row of `llama_slot_waiters` naming the backends that may serve it, and one
  call (`llama_gate_slot_wait`) also grants it a slot at once when one is free;
- every grant is made by `llama_gate_slot_grant` under one advisory lock: a free slot goes to the
  waiting user served least recently, whichever process their request waits in, and the process
  owning that request hears of it by NOTIFY (and, should a notification be lost, by asking every
  `POLL_SECONDS` while it has requests waiting, which also frees expired leases);
- the request runs while its process holds the lease (`llama_slot_leases`), renewed every
  `RENEW_SECONDS`; it expires `LEASE_SECONDS` after the last renewal, so a killed process's slots
  come back within that, and its waiting requests are dropped;
- the per-user concurrency cap is counted across processes when the request is queued;
- which backend last served each conversation is kept there too (by digest), so the next turn
  goes where the conversation is warm whichever process it comes through.

Switching is exact: a process that finds peers sends its new requests here, records what it
already runs as `lone` leases, and only then says it is shared; grants wait until every live
process says so. It switches back to the path in memory once it is alone and holds nothing here.
While Postgres is unreachable (an outage, not a slow answer) requests take the path in memory,
each process counting only its own. After a crash of Postgres, which empties these UNLOGGED
tables, each renewal writes back the backends' slots and the leases its process holds, and a
waiting request whose row is gone queues again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

import asyncpg

from proxy.background import background
from proxy.db import cluster
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.pool import Database
from proxy.errors import SlotsUnavailable, TooManyConcurrent
from proxy.upstream.affinity import Affinity
from proxy.upstream.backends import GroupCap

log = logging.getLogger(__name__)

LEASE_SECONDS = 6.0  # a lease not renewed for this long is free again
RENEW_SECONDS = 2.0
POLL_SECONDS = 1.0  # while requests wait: ask for grants (and free expired leases)
STALE_SECONDS = 10.0  # a process not seen for this long is gone (the presence beat's)
UNCAPPED = 2**31 - 1
LOST = ""  # what a waiting request hears when its row is gone: it queues again


class SharedSlots:
    def __init__(
        self,
        database: Database,
        proxy_id: str,
        slots: Callable[[], dict[str, int]],
        lone: Callable[[], dict[str, int]],
        requeue: Callable[[], None],
        forced: bool = False,
    ) -> None:
        self._db = database
        self._proxy_id = proxy_id
        self._slots = slots  # backend -> its slots, as this process is configured
        self._lone = lone  # backend -> requests this process runs without a lease
        self._requeue = requeue  # send the requests waiting in memory to take their turn here
        self._forced = forced  # one of `serve --workers N`: shared from the start
        self.active = False  # requests take their turns here
        self.recorded = False  # ... and what ran before is recorded: the row may say "shared"
        self._leases: dict[int, tuple[str, int]] = {}  # granted, until released: backend, user
        self._waiting: dict[int, asyncio.Future[str]] = {}  # asked for, NOTIFY may answer
        self._queued: set[int] = set()  # of those, the ones known to be rows of the wait
        self._to_queue: list[tuple[dict[str, object], asyncio.Future[str | None]]] = []
        self._queuer: asyncio.Task[None] | None = None
        self._to_release: list[int] = []
        self._releaser: asyncio.Task[None] | None = None
        self.grants_heard = 0  # grants that came by NOTIFY (tests check the path)

    # -- switching ----------------------------------------------------------------------------

    async def observe(self, peers: int) -> bool:
        """Take in how many other processes are live (after each presence beat; 0 before the
        first); True when what this process's row says changed, so it should be written now."""
        if (peers > 0 or self._forced) and not self.active:
            self.active = True  # new requests wait here from now on: none escapes the record
            self._requeue()
            log.info("backend slots are shared with other proxy processes (through Postgres)")
        if self.active and not self.recorded:
            try:
                await self._renew()  # the backends' slots, and what runs from before
            except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                log.warning("cannot record this process's backend slots yet (%s)", exc)
                return False
            self.recorded = True
            return True
        if peers == 0 and not self._forced and self.active and not self._held():
            self.active = self.recorded = False
            log.info("this proxy process is alone again: backend slots are its own")
            return True
        return False

    def database_up(self) -> bool:
        """Whether Postgres is reachable (a slow answer is not an outage)."""
        return self._db.up

    def _held(self) -> bool:
        return bool(
            self._leases or self._waiting or self._to_queue or self._to_release or self._releaser
        )

    # -- a turn ---------------------------------------------------------------------------------

    async def turn(
        self,
        user_id: int,
        backends: list[str],
        prefer: str | None,
        cap: int | None,
        budget: float,
        affinity: Affinity | None = None,
        group_caps: Sequence[GroupCap] = (),
    ) -> tuple[str, int]:
        """Wait (up to `budget` seconds, then `TimeoutError`) for a lease on a slot of one of
        `backends`: the backend and the lease's id. `SlotsUnavailable` when Postgres cannot be
        asked; `TooManyConcurrent` when the user holds `cap` places across processes, or one of
        `group_caps` is full across processes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while True:
            request_id = secrets.randbits(62) + 1
            granted = await self._turn(request_id, user_id, backends, prefer, cap, deadline,
                                       affinity, group_caps)  # fmt: skip
            if granted != LOST:
                self._leases[request_id] = (granted, user_id)
                return granted, request_id
            # Its row is gone (Postgres restarted, or this process could not renew it for
            # LEASE_SECONDS): queue again, at the back, within what is left of the budget.
            log.warning("a request lost its place waiting for a backend slot; queued again")

    async def _turn(
        self,
        request_id: int,
        user_id: int,
        backends: list[str],
        prefer: str | None,
        cap: int | None,
        deadline: float,
        affinity: Affinity | None,
        group_caps: Sequence[GroupCap] = (),
    ) -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._waiting[request_id] = future  # before asking: the NOTIFY may come first
        answer: asyncio.Future[str | None] = loop.create_future()
        ask: dict[str, object] = {
            "id": request_id, "user": user_id, "backends": backends, "prefer": prefer,
            "cap": cap or UNCAPPED,
        }  # fmt: skip
        if group_caps:
            ask["groups"] = [[group.group_id, group.cap] for group in group_caps]
        if affinity is not None and len(backends) > 1:  # where it is warm, whoever served it
            ask["conversation"] = affinity.key.hex()
            ask["prefixes"] = [prefix.hex() for prefix in affinity.prefixes]
        self._to_queue.append((ask, answer))
        if self._queuer is None:
            self._queuer = asyncio.create_task(self._queue_batches())
        try:
            granted = await answer
        except BaseException:  # Postgres away (SlotsUnavailable), or the client left
            del self._waiting[request_id]
            if (ask, answer) in self._to_queue:
                self._to_queue.remove((ask, answer))  # never asked: nothing to give back
            elif answer.done() and not answer.cancelled() and answer.exception() is None:
                self._release_soon(request_id)  # answered as the client left: queued or granted
            # else its batch is out (it gives it back once it returns), or it failed (given back)
            raise
        if granted == "!cap":
            del self._waiting[request_id]
            raise TooManyConcurrent(cap or UNCAPPED)
        if granted is not None and granted.startswith("!gcap:"):
            del self._waiting[request_id]
            full = next(g for g in group_caps if str(g.group_id) == granted.removeprefix("!gcap:"))
            raise TooManyConcurrent(full.cap, f"group {full.name!r}")
        try:
            if granted is None:
                self._queued.add(request_id)
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    granted = await future
        except BaseException:
            self._release_soon(request_id)  # queued or granted: either way, given back
            raise
        finally:
            self._waiting.pop(request_id, None)
            self._queued.discard(request_id)
        return granted

    async def _queue_batches(self) -> None:
        """Queue what waits to be queued, in one call for all that arrived meanwhile (group
        commit: a burst costs a few calls, not one each)."""
        try:
            while self._to_queue:
                batch, self._to_queue = self._to_queue, []
                asks = [ask for ask, _ in batch]
                try:
                    answers = await self._db.run(
                        partial(
                            cluster.wait_for_slots,
                            proxy_id=self._proxy_id,
                            requests=asks,
                            lease_seconds=LEASE_SECONDS,
                            stale_seconds=STALE_SECONDS,
                        )
                    )
                except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                    for ask, answer in batch:
                        # A call cut short may still have queued them: given back either way.
                        self._release_soon(int(str(ask["id"])))
                        if not answer.done():
                            answer.set_exception(SlotsUnavailable(str(exc)))
                    continue
                for ask, answer in batch:
                    if answer.done():  # its client left while the batch was out
                        self._release_soon(int(str(ask["id"])))
                    else:
                        answer.set_result(answers[int(str(ask["id"]))])
        finally:
            self._queuer = None

    def release(self, request_id: int) -> None:
        """Give back a lease (in the background: the request's answer is not held up)."""
        self._leases.pop(request_id, None)
        self._release_soon(request_id)

    def _release_soon(self, request_id: int) -> None:
        self._to_release.append(request_id)
        if self._releaser is None:
            self._releaser = asyncio.create_task(self._release_batches())

    async def _release_batches(self) -> None:
        """Give back what waits to be given back, in one call for all that ended meanwhile."""
        try:
            while self._to_release:
                batch, self._to_release = sorted(set(self._to_release)), []
                try:
                    await self._db.run(
                        partial(
                            cluster.release_slots,
                            request_ids=batch,
                            lease_seconds=LEASE_SECONDS,
                            stale_seconds=STALE_SECONDS,
                        )
                    )
                except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                    log.warning(
                        "cannot give back %d backend slot(s) (%s); their leases expire instead",
                        len(batch),
                        exc,
                    )
        finally:
            self._releaser = None

    def heard(self, payload: str) -> None:
        """A NOTIFY on the slots channel: "<proxy id> <request id> <backend>"."""
        proxy_id, _, rest = payload.partition(" ")
        if proxy_id != self._proxy_id:
            return
        request_id, _, backend = rest.partition(" ")
        future = self._waiting.get(int(request_id))
        if future is not None and not future.done():
            self.grants_heard += 1
            future.set_result(backend)

    # -- renewing and polling -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Renew leases and poll for grants while entered; on the way out, give all back."""
        try:
            async with background(self._tick_forever()):
                yield
        finally:
            for pending in (self._queuer, self._releaser):
                if pending is not None:
                    await asyncio.gather(pending, return_exceptions=True)
            if self.active:
                with contextlib.suppress(DatabaseUnavailable, asyncpg.PostgresError):
                    await self._db.run(self._leave)

    async def _leave(self, con: Connection) -> None:
        await cluster.leave_slots(con, self._proxy_id)
        await cluster.grant_slots(con, LEASE_SECONDS, STALE_SECONDS)  # others' turn, at once

    async def _tick_forever(self) -> None:
        since_renewal = 0.0
        while True:
            await asyncio.sleep(POLL_SECONDS)
            since_renewal += POLL_SECONDS
            try:
                if self._queued:
                    await self._poll()
                if self.active and since_renewal >= RENEW_SECONDS:
                    since_renewal = 0.0
                    await self._renew()
                    self.recorded = True
            except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                log.warning("cannot renew backend slot leases (%s); trying again", exc)

    async def _poll(self) -> None:
        waiting = list(self._queued)

        async def ask(con: Connection) -> dict[int, str | None]:
            await cluster.grant_slots(con, LEASE_SECONDS, STALE_SECONDS)
            return await cluster.slot_states(con, self._proxy_id, waiting)

        states = await self._db.run(ask)
        for request_id in waiting:
            future = self._waiting.get(request_id)
            if future is None or future.done():
                continue  # answered meanwhile
            if request_id not in states:
                future.set_result(LOST)
            elif (backend := states[request_id]) is not None:
                future.set_result(backend)  # granted (its NOTIFY was lost)

    async def _renew(self) -> None:
        """Renew (or, after a crash of Postgres, write back) what this process holds."""
        leases = [(request_id, *held) for request_id, held in self._leases.items()]
        waiting, lone, slots = list(self._queued), self._lone(), self._slots()
        await self._db.run(
            lambda con: cluster.renew_slots(
                con, self._proxy_id, slots, leases, waiting, lone, LEASE_SECONDS
            )
        )
        # A lease given back while this ran may have been written back: give it back again.
        for request_id, _, _ in leases:
            if request_id not in self._leases:
                self._release_soon(request_id)
