"""Requests without a valid key, counted per client address and minute instead of a row each.

Every request that reaches the proxy is accounted for, but one that never showed a valid key (a
401, a path that does not exist, a flood refused at the door) has no user to bill and nothing
the ledger needs a row for: a junk flood would otherwise grow `llama_requests` by a row a
request. So those requests are counted here, in memory, per minute and client address (with
their statuses and paths), and added to `llama_unauthenticated` every few seconds. Within a
minute at most `max_addresses` addresses get a row of their own (the rest count together as
`(others)`) and each row names at most `max_paths` paths (the rest count as `(others)`): the
database grows by a bounded number of rows a minute however large the flood, from however many
addresses. While Postgres is unreachable the counts wait in memory (the newest
`KEEP_MINUTES` minutes; older ones are dropped, with a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from proxy.audit.row import AuditRow
from proxy.db import ledger
from proxy.db.connect import DatabaseUnavailable
from proxy.db.pool import Database

log = logging.getLogger(__name__)

OTHERS = "(others)"
FLUSH_SECONDS = 5.0
KEEP_MINUTES = 60
MAX_ADDRESSES = 1000  # per minute, with a row of their own
MAX_PATHS = 20  # per row


@dataclass
class _Count:
    requests: int = 0
    request_bytes: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)


class Strangers:
    """Counts of requests that had no valid key, written in aggregate."""

    def __init__(
        self, database: Database, max_addresses: int = MAX_ADDRESSES, max_paths: int = MAX_PATHS
    ) -> None:
        self._db = database
        self._max_addresses = max_addresses
        self._max_paths = max_paths
        self._minutes: dict[datetime, dict[str, _Count]] = {}
        self._dropped = 0

    def observe(self, row: AuditRow) -> None:
        """Count `row`, a finished request with no caller (called on the event loop)."""
        minute = row.created_at.replace(second=0, microsecond=0)
        addresses = self._minutes.setdefault(minute, {})
        address = row.client_addr or "unknown"
        if address not in addresses and len(addresses) >= self._max_addresses:
            address = OTHERS
        count = addresses.setdefault(address, _Count())
        count.requests += 1
        count.request_bytes += row.request_bytes
        count.statuses[str(row.status_code)] += 1
        path = row.path if row.path in count.paths or len(count.paths) < self._max_paths else OTHERS
        count.paths[path] += 1
        if len(self._minutes) > KEEP_MINUTES:
            oldest = min(self._minutes)
            self._dropped += sum(c.requests for c in self._minutes.pop(oldest).values())

    @property
    def pending(self) -> int:
        """Requests counted here and not yet written."""
        return sum(c.requests for counts in self._minutes.values() for c in counts.values())

    async def run(self) -> None:
        """Write the counts every `FLUSH_SECONDS` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                try:
                    await self.flush()
                except Exception:
                    log.exception("could not record the requests without a valid key")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Add what was counted so far to the table (kept for later if Postgres is away)."""
        if self._dropped:
            log.warning(
                "%d requests without a valid key were not recorded: Postgres was unreachable "
                "for over %d minutes",
                self._dropped,
                KEEP_MINUTES,
            )
            self._dropped = 0
        taken, self._minutes = self._minutes, {}
        rows = [
            (
                minute,
                address,
                count.requests,
                count.request_bytes,
                json.dumps(count.statuses),
                json.dumps(count.paths),
            )
            for minute, addresses in taken.items()
            for address, count in addresses.items()
        ]
        if not rows:
            return
        try:
            await self._db.run(lambda con: ledger.add_unauthenticated(con, rows))
        except DatabaseUnavailable:
            self._restore(taken)

    def _restore(self, taken: dict[datetime, dict[str, _Count]]) -> None:
        """Put back counts that could not be written (new ones may have come meanwhile)."""
        for minute, addresses in taken.items():
            mine = self._minutes.setdefault(minute, {})
            for address, count in addresses.items():
                into = mine.setdefault(address, _Count())
                into.requests += count.requests
                into.request_bytes += count.request_bytes
                into.statuses.update(count.statuses)
                into.paths.update(count.paths)
