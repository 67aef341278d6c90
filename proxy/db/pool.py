"""The proxy's one Postgres pool, with a short circuit for when Postgres is down.

Every query on the request path goes through `Database.run`, so an outage is detected, logged
once and answered from memory in one place: after a failure to connect (or a lost connection),
callers skip Postgres for `RETRY_SECONDS` instead of each paying a connection attempt, then the
next call tries again.

A busy pool is no outage: when every connection is in use past the query timeout, or a query
itself runs past it, that one call raises `DatabaseBusy` (callers answer it from memory like an
outage), but nobody else skips Postgres because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from proxy.db import connect
from proxy.db.connect import Connection, DatabaseUnavailable, create_pool
from proxy.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_SECONDS = 1.0
POOL_SIZE = 10

# What an unreachable, restarting or refusing server raises: no connection can be had or kept.
# Errors about the query itself (a constraint, bad data) are no outage: they propagate, so one
# odd request cannot make every caller skip Postgres for a second.
_OUTAGE = (
    OSError,
    asyncpg.InterfaceError,  # the connection is closed
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down or starting up (not a cancelled query)
    asyncpg.InsufficientResourcesError,  # too many connections, disk full, out of memory
)


class DatabaseBusy(DatabaseUnavailable):
    """Postgres is reachable but this call got no answer in time (pool in use, slow query)."""


class Database:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._timeout = float(settings.db_timeout_seconds)
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._skip_until = 0.0
        self._down_since: float | None = None
        self._last_error = ""

    async def open(self) -> None:
        # min_size=0 connects lazily, so the proxy starts (and serves cached keys) even while
        # Postgres is down, and recovers by itself when it returns.
        self._pool = await create_pool(
            self._settings,
            min_size=0,
            max_size=POOL_SIZE,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
        )
        with contextlib.suppress(DatabaseUnavailable):  # logged by run(); requests retry
            await self.run(connect.ping)

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 10)

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool, for writers off the request path (they handle outages themselves)."""
        if self._pool is None:
            raise DatabaseUnavailable("the database pool is not open")
        return self._pool

    @property
    def up(self) -> bool:
        return self._down_since is None

    def retry_now(self) -> None:
        """Postgres answered elsewhere (the auth listener connected): stop skipping it."""
        self._skip_until = 0.0

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` on a pooled connection within the query timeout.

        Raises `DatabaseUnavailable` at once while a recent failure says Postgres is down.
        """
        if self._pool is None:
            raise DatabaseUnavailable("the database pool is not open")
        if self._clock() < self._skip_until:
            raise DatabaseUnavailable(f"Postgres is unreachable: {self._last_error}")
        querying = False
        try:
            async with asyncio.timeout(self._timeout):
                async with self._pool.acquire() as con:
                    querying = True
                    result = await work(con)
        except asyncpg.QueryCanceledError:
            raise DatabaseBusy("Postgres cancelled a query that ran too long") from None
        except TimeoutError:  # before _OUTAGE: TimeoutError is an OSError
            if querying or self._all_in_use():
                raise DatabaseBusy(
                    f"Postgres did not answer within {self._timeout:g} s "
                    + ("(slow query)" if querying else "(every pooled connection in use)")
                ) from None
            self._failed(TimeoutError())  # connecting took too long: that is an outage
            raise DatabaseUnavailable(f"Postgres is unreachable: {self._last_error}") from None
        except _OUTAGE as exc:
            self._failed(exc)
            raise DatabaseUnavailable(f"Postgres is unreachable: {self._last_error}") from None
        if self._down_since is not None:
            log.warning(
                "Postgres at %s is reachable again after %.1f s",
                self._settings.database_label,
                self._clock() - self._down_since,
            )
            self._down_since = None
        return result

    def _all_in_use(self) -> bool:
        pool = self._pool
        return pool is not None and pool.get_size() >= POOL_SIZE and pool.get_idle_size() == 0

    def _failed(self, exc: BaseException) -> None:
        now = self._clock()
        self._skip_until = now + RETRY_SECONDS
        self._last_error = _reason(exc)
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "Postgres at %s is unreachable (%s): serving recently verified keys from memory "
                "and enforcing rate limits per process until it returns",
                self._settings.database_label,
                self._last_error,
            )


async def _keep_session(_con: asyncpg.Connection) -> None:
    """Hand a connection back as it is (asyncpg still rolls back an open transaction).

    asyncpg's default reset sends `RESET ALL; UNLISTEN *; ...` on every release: one more round
    trip per request, for session state this proxy never sets (pooled connections run no SET,
    LISTEN or session-level advisory locks: the listener has its own connection and the rate
    limiter's locks end with their transaction).
    """


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the query timeout"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
