"""Hears revocations from Postgres (LISTEN/NOTIFY) so every proxy drops stale keys within a second.

Migration 0002's triggers NOTIFY `accounts.AUTH_CHANNEL` when a key is revoked, expires, or is
deleted, or a user changes or is deleted. The listener holds one dedicated connection (a pooled
one could be handed to a query mid-notification). A notification lost while that connection is
down cannot be replayed, so each (re)connect has every cached key re-checked at once, and the
cache's freshness limit bounds staleness meanwhile. A connection that dies silently is found by a
ping every `PING_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from proxy.db import accounts
from proxy.db.connect import Connection, DatabaseUnavailable, connect, ping
from proxy.settings import Settings

log = logging.getLogger(__name__)

PING_SECONDS = 10.0
RETRY_MIN_SECONDS = 0.2
# While disconnected the proxy hears no revocation, so after Postgres returns (a restart takes
# seconds) the listener must be back within a second: retries never grow further apart than
# this. A refused connection costs next to nothing; one to an unreachable host is bounded by
# the connect timeout.
RETRY_MAX_SECONDS = 0.5


class AuthListener:
    def __init__(
        self,
        settings: Settings,
        on_notice: Callable[[str], None],
        on_connect: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._on_notice = on_notice
        self._on_connect = on_connect
        self.connected = asyncio.Event()  # set while LISTEN is active (tests wait on it)
        self.connections = 0  # how many times LISTEN was (re)established
        self._outage_logged = False
        self._others: dict[str, Callable[[str], None]] = {}

    def also(self, channel: str, on_notice: Callable[[str], None]) -> None:
        """Hear `channel` too, on the same connection (before `run`); a notification lost while
        it is down is not replayed, so its user must also ask for what it waits for."""
        self._others[channel] = on_notice

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        delay = RETRY_MIN_SECONDS
        while True:
            try:
                await self._listen_once()
                delay = RETRY_MIN_SECONDS
            except (DatabaseUnavailable, OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:  # fmt: skip
                if not self._outage_logged:
                    self._outage_logged = True
                    log.warning("auth listener cannot reach Postgres (%s); retrying", exc)
            finally:
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _listen_once(self) -> None:
        con = await connect(
            self._settings, server_settings={"application_name": "llama-gate auth listener"}
        )
        lost = asyncio.Event()
        con.add_termination_listener(lambda _con: lost.set())
        try:
            await con.add_listener(accounts.AUTH_CHANNEL, self._notified)
            for channel, on_notice in self._others.items():
                await con.add_listener(channel, _calling(on_notice))
            # Only now, with LISTEN active, is it safe to re-check what may have been missed.
            self._on_connect()
            self.connections += 1
            self.connected.set()
            self._outage_logged = False
            if self.connections > 1:
                log.warning("auth listener reconnected; cached keys will be re-checked")
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), PING_SECONDS)
                except TimeoutError:
                    await asyncio.wait_for(ping(con), self._settings.db_timeout_seconds)
            raise DatabaseUnavailable("the listener's connection was closed")
        finally:
            con.terminate()  # close() could wait on a dead socket

    def _notified(self, _con: Connection, _pid: int, _channel: str, payload: object) -> None:
        try:
            self._on_notice(str(payload))
        except Exception:
            log.exception("handling auth notification %r failed", payload)


def _calling(
    on_notice: Callable[[str], None],
) -> Callable[[Connection, int, str, object], None]:
    def notified(_con: Connection, _pid: int, channel: str, payload: object) -> None:
        try:
            on_notice(str(payload))
        except Exception:
            log.exception("handling a notification on %s (%r) failed", channel, payload)

    return notified
