"""The audit writer: one `llama_requests` row per request, written off the request path, never lost.

Requests hand finished rows to `AuditWriter.submit`, which appends each to the journal on disk
(one plain `write`, see `proxy.audit.journal`: a killed process loses no row) and to a deque. A
background task writes them in batches with COPY. Each batch carries a UUID that is recorded in
`llama_audit_batches` in the same transaction as its rows, so a batch retried after an ambiguous
failure (the connection died around COMMIT), or replayed from a spill file by two processes, is
written exactly once. While Postgres is unreachable rows stay in memory up to a bound, then spill
as JSON lines to files under `runtime/audit-spill/`, which are replayed when the database returns
or at the next start.

A batch Postgres refuses for its content (a row it cannot store) is split in halves until the
refused rows stand alone; those are set aside in `rejected.jsonl` and the rest is written. The
halves' ids derive from the batch's, so a batch isolated twice (after a crash, or from a spill
file) still writes each row once. A failure of the writer itself is logged, counted, and the
writer started again with every row it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import asyncpg

from proxy.audit.journal import SYNC_SECONDS, Journal
from proxy.audit.journal import claims as journal_claims
from proxy.audit.row import COLUMNS, AuditRow
from proxy.audit.spill import Batch, SpillFiles
from proxy.db import ledger
from proxy.db.connect import DatabaseUnavailable

log = logging.getLogger(__name__)

# What Postgres (or the driver encoding a row for it) answers about the rows themselves:
# retrying the same rows cannot help.
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    UnicodeError,
    ValueError,
    TypeError,
)

WRITE_TIMEOUT_SECONDS = 5.0
RESTART_MAX_SECONDS = 5.0
# How often a live writer looks for files a process that died left behind (at start: at once).
REPLAY_SCAN_SECONDS = 10.0
_OUTAGE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    TimeoutError,
    DatabaseUnavailable,
)


def part_of(batch_id: uuid.UUID, half: str) -> uuid.UUID:
    """The id of one half of a batch: the same every time the batch is split."""
    return uuid.uuid5(batch_id, half)


class AuditWriter:
    """Batches rows into Postgres; holds, spills and replays them while Postgres is away."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        spill_dir: Path,
        *,
        journal: bool = True,
        batch_size: int = 1000,
        flush_interval: float | None = None,
        memory_rows: int = 20_000,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self._pool = pool
        self._spills = SpillFiles(spill_dir)
        self._folder = spill_dir
        self._journal = Journal(spill_dir) if journal else None
        self._batch_size = batch_size
        # Each round of batches begins with an fsync of the journal (their ids must be durable
        # before Postgres has them), and an fsync costs the event loop more than its own time
        # (measured: 5 a second cost ~10 % of the proxy's throughput, 1 a second nothing that
        # shows): with a journal, rows are written about once a second.
        if flush_interval is None:
            flush_interval = SYNC_SECONDS if self._journal is not None else 0.2
        self._flush_interval = flush_interval
        self._memory_rows = memory_rows
        self._retry_max = retry_max_seconds
        self._pending: deque[AuditRow] = deque()
        # Batches formed (their ids journaled) and not yet written; one whose write failed
        # keeps its id, as its fate may be unknown.
        self._formed: deque[Batch] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._db_down_since: float | None = None
        self._next_scan = 0.0
        self.rows_written = 0
        self.rows_spilled = 0
        self.rows_rejected = 0
        self.restarts = 0  # times the writer failed unexpectedly and was started again

    # -- the request side ------------------------------------------------------------------

    def submit(self, row: AuditRow) -> None:
        """Journal and queue a row; constant time, never waits for the disk, never raises.

        Called before the request's answer is complete, so every answered request's row is in
        the journal when its client has the answer.
        """
        if self._journal is not None:
            self._journal.append(row)
        self._pending.append(row)
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet in Postgres nor in a spill file."""
        return len(self._pending) + sum(len(rows) for _, rows in self._formed)

    def spilled_bytes(self) -> int:
        return self._spills.size_bytes()

    @property
    def unreadable_files(self) -> int:
        return self._spills.unreadable

    @property
    def journal_failures(self) -> int:
        return self._journal.failures if self._journal is not None else 0

    @property
    def journal_syncs(self) -> int:
        """How many times the journal was fsynced with rows not yet on disk."""
        return self._journal.syncs if self._journal is not None else 0

    # -- the background side ---------------------------------------------------------------

    async def run(self, shutdown_timeout: float = 10.0) -> None:
        """Write until `stop()`, then flush what is left; one task for the writer's whole life.

        Rows Postgres will not take before `shutdown_timeout` go to a spill file. An unexpected
        failure never ends this: it is logged and the writing starts again, rows kept.
        """
        delay = self._flush_interval
        syncing = asyncio.create_task(self._sync_journal())
        while not self._closing:
            try:
                await self._write_until_stopped()
            except Exception:
                self.restarts += 1
                log.exception(
                    "the audit writer failed (restart %d); starting it again with its %d rows",
                    self.restarts,
                    self.backlog,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(delay * 2, RESTART_MAX_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), shutdown_timeout)
        self._spill()
        self._spills.release()
        syncing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await syncing
        if self._journal is not None:
            self._journal.close()

    async def _sync_journal(self) -> None:
        """An fsync about once a second bounds what a machine crash can lose (also while
        Postgres is away and the writer's rounds grow further apart)."""
        while self._journal is not None:
            await asyncio.sleep(SYNC_SECONDS)
            if time.monotonic() - self._journal.synced_at >= SYNC_SECONDS:
                await self._journal.sync()

    async def _write_until_stopped(self) -> None:
        delay = self._flush_interval
        await self._replay()  # what an earlier run (or a crashed process) left behind
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._closing:
                return
            if await self._drain(everything=False):
                delay = self._flush_interval
                spilled = self.rows_spilled and self._spills.paths()
                if spilled or time.monotonic() > self._next_scan:
                    await self._replay()
            else:
                delay = min(max(delay * 2, 0.25), self._retry_max)
                if self.backlog > self._memory_rows:
                    self._spill()

    def stop(self) -> None:
        """Ask `run()` to flush and return; rows submitted until it returns are still written."""
        self._closing = True
        self._wake.set()

    async def _drain(self, everything: bool = True) -> bool:
        """Write pending rows in batches; False when Postgres failed (rows are kept).

        One round writes the batches left from an earlier one, or else what is pending as it
        begins; rows that come meanwhile wait for the next round unless `everything` (a stop).
        A round per arrival instead, under a steady load, cost a journal, an fsync and a
        Postgres commit every few requests."""
        while self._formed or self._pending:
            if not self._formed:
                while self._pending:
                    self._formed.append(self._batch())
                if self._journal is not None:
                    # The batches' ids are on disk before Postgres may have them: one fsync
                    # for the round's batches and their rows, whose journal then ends.
                    await self._journal.sync(new_journal=True)
            while self._formed:
                if not await self._write(self._formed[0]):
                    return False
                self._formed.popleft()
            if self._journal is not None:
                self._journal.retire()  # each of its rows is in Postgres now
            if not everything:
                break
        self._caught_up()
        return True

    def _batch(self) -> Batch:
        """The oldest pending rows as a new batch, its id journaled before it goes anywhere."""
        count = min(self._batch_size, len(self._pending))
        batch = (uuid.uuid4(), [self._pending.popleft() for _ in range(count)])
        if self._journal is not None:
            self._journal.mark(batch[0], count)
        return batch

    def _caught_up(self) -> None:
        if self._journal is not None and not self._formed and not self._pending:
            self._journal.caught_up()

    async def _write(self, batch: Batch) -> bool:
        """Write one batch exactly once; False when Postgres is away (the batch is kept)."""
        batch_id, rows = batch
        try:
            async with self._pool().acquire(timeout=WRITE_TIMEOUT_SECONDS) as con:
                fresh = await ledger.write_audit_batch(
                    con, batch_id, COLUMNS, rows, WRITE_TIMEOUT_SECONDS
                )
        except _REFUSED as exc:
            # Postgres will refuse this batch every time. Its transaction rolled back, so none
            # of it was written: find the rows it refuses, so they hold back no other row.
            return await self._isolate(batch, exc)
        except _OUTAGE as exc:
            if self._db_down_since is None:
                self._db_down_since = time.monotonic()
                log.warning(
                    "audit rows cannot be written (%s: %s); keeping them and retrying",
                    type(exc).__name__,
                    exc,
                )
            return False
        if self._db_down_since is not None:
            log.warning("audit writes resumed after %.1f s", time.monotonic() - self._db_down_since)
            self._db_down_since = None
        if fresh:  # False: an earlier attempt had committed it after all
            self.rows_written += len(rows)
        return True

    async def _isolate(self, batch: Batch, exc: Exception) -> bool:
        batch_id, rows = batch
        if len(rows) == 1:
            log.error(
                "Postgres refused the audit row of request %s (%s: %s); kept in %s",
                rows[0].request_id,
                type(exc).__name__,
                exc,
                self._spills.reject(rows[0], f"{type(exc).__name__}: {exc}"),
            )
            self.rows_rejected += 1
            return True
        middle = len(rows) // 2
        for half, part in (("a", rows[:middle]), ("b", rows[middle:])):
            if not await self._write((part_of(batch_id, half), part)):
                return False  # Postgres went away: the whole batch is retried, halves included
        return True

    def _spill(self) -> None:
        """Move every row held (formed batches with their ids) to our spill file."""
        batches = list(self._formed)
        self._formed.clear()
        while self._pending:
            batches.append(self._batch())
        if batches:
            if self._journal is not None:
                # Rare (Postgres has been away a while) and must not let go of the loop: the
                # ids go to disk before the rows reach a spill file under them.
                self._journal.sync_now()
            self._spills.append(batches)
            self.rows_spilled += sum(len(rows) for _, rows in batches)
        self._caught_up()

    async def _replay(self) -> None:
        """Write what spill files and the journals of dead processes hold, each exactly once."""
        self._next_scan = time.monotonic() + REPLAY_SCAN_SECONDS
        journals = journal_claims(self._folder, self._spills.count_kept)
        for claim in itertools.chain(self._spills.claims(), journals):
            try:
                for batch in claim.batches():
                    if not await self._write(batch):
                        return  # Postgres went away again; the file stays for the next attempt
                claim.done()
            finally:
                claim.release()
