"""Each proxy process's presence in Postgres: that it serves, and what it is doing now.

Every `BEAT_SECONDS` a process writes its row of `llama_proxies` (one statement): its host and pid
and its live figures, per backend its busy slots and waiting requests, per user id its requests
being served and waiting. A row not refreshed for `STALE_SECONDS` belongs to a process that is
gone (killed, or cut off from Postgres): it is ignored, and deleted by the next beat of any
process. A process that stops deletes its own row. The dashboard's Live page shows every process
from these rows; while Postgres is unreachable it shows this process alone.

Each beat also counts the other live processes, which is how processes find each other: the
count goes to the shared slots (`proxy.cluster.slots`), which switch on when it is above 0, and
the row says `shared` once this process's slots are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from proxy.cluster.slots import SharedSlots
from proxy.db import cluster
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.pool import Database
from proxy.upstream.backends import Backends

log = logging.getLogger(__name__)

BEAT_SECONDS = 2.0
STALE_SECONDS = 10.0  # five missed beats: the process is gone
LEAVE_WAIT_SECONDS = 2.0  # for a beat under way to end, as the process leaves


def local_figures(backends: Backends, held: Mapping[Hashable, int]) -> dict[str, Any]:
    """This process's live figures, JSON-ready: per backend its busy slots (`slots` of them) and
    the requests waiting that it could serve; per user (by id, as text) `[served, waiting]`.
    `held` counts each user's requests from admission to their end, waiting ones included."""
    waiting = backends.waiting_by_user()
    users = {
        str(user): [held.get(user, 0) - waiting.get(user, 0), waiting.get(user, 0)]
        for user in set(held) | set(waiting)
    }
    shown = [
        {
            "name": upstream.name,
            "busy": backends.in_flight(upstream.name),
            "slots": backends.slots(upstream.name),
            "queued": backends.queued(upstream.name),
        }
        for upstream in backends.upstreams
    ]
    return {"backends": shown, "users": users}


@dataclass(frozen=True)
class Peer:
    """Another live process, as its last beat described it."""

    id: str
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime
    live: dict[str, Any]


def new_id() -> str:
    """A process's id in llama_proxies: its host, its pid, and a nonce (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Presence:
    def __init__(
        self,
        database: Database,
        figures: Callable[[], dict[str, Any]],
        slots: SharedSlots,
        proxy_id: str,
    ) -> None:
        self._db = database
        self._figures = figures  # this process's live figures, JSON-ready
        self._slots = slots  # told how many others are live after each beat
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = proxy_id

    @contextlib.asynccontextmanager
    async def beating(self) -> AsyncIterator[None]:
        """Beat for as long as this is entered; on the way out, leave (delete the row). The first
        beat comes before: a process finds its peers before it serves."""
        with contextlib.suppress(DatabaseUnavailable, asyncpg.PostgresError):
            await self._slots.observe(0)  # one of `--workers`: shared before its row says so
            await self.beat()
        stop = asyncio.Event()
        task = asyncio.create_task(self._beat_forever(stop))
        try:
            yield
        finally:
            # A beat under way ends before the row is deleted: cancelled, its write could still
            # reach Postgres after the DELETE and put the row back (its upsert waits for the
            # DELETE's row lock, then finds no row and inserts one).
            stop.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, LEAVE_WAIT_SECONDS)  # cancelled past that
            with contextlib.suppress(DatabaseUnavailable, asyncpg.PostgresError):
                await self._db.run(lambda con: cluster.leave_proxy(con, self.id))

    async def beat(self) -> None:
        """Write this process's row; when that makes the slots switch (shared or not), write
        it again at once, so that other processes wait no longer than needed."""
        for _ in range(2):
            others = await self._db.run(self._write)
            if not await self._slots.observe(others):
                return

    async def _write(self, con: Connection) -> int:
        live = json.dumps(self._figures())
        return await cluster.beat_proxy(
            con, self.id, self.host, self.pid, live, STALE_SECONDS, self._slots.recorded
        )

    async def peers(self) -> list[Peer]:
        """The other processes seen within `STALE_SECONDS` (none while Postgres is away)."""
        try:
            rows = await self._db.run(lambda con: cluster.live_proxies(con, STALE_SECONDS))
        except (DatabaseUnavailable, asyncpg.PostgresError):  # down, or not migrated yet
            return []
        return [
            Peer(r["id"], r["host"], r["pid"], r["started_at"], r["seen_at"], json.loads(r["live"]))
            for r in rows
            if r["id"] != self.id
        ]

    async def _beat_forever(self, stop: asyncio.Event) -> None:
        missed = False
        while not stop.is_set():
            try:
                await self.beat()
                missed = False
            except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                # Postgres away, or a database not migrated yet (`llama-gate init-db`): the
                # process serves on; the Live page shows it alone meanwhile.
                if not missed:
                    log.warning(
                        "cannot record this process's presence (%s); trying every %s s",
                        type(exc).__name__,
                        BEAT_SECONDS,
                    )
                missed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BEAT_SECONDS)
