"""The audit journal: each finished request's row is on disk before its answer is complete.

`AuditWriter.submit` appends the row to this process's journal with one plain `write`, which the
kernel keeps when the process is killed; the request path never waits for the disk. An `fsync`
about once a second, on a worker thread, bounds what a machine crash can lose.

When the writer forms a batch it appends a marker naming the batch's id and size, and makes it
durable, before the batch may reach Postgres or a spill file. So a replay gives each batch the
id it had, and a batch Postgres committed just before the process died is not written twice
(batch ids are recorded with their rows: `proxy.audit.writer`). Rows after the last marker were
never sent; a replay writes them under ids derived from the journal's, the same at every replay.
Each round of the writer (about once a second) ends the journal its batches were formed from:
appends go on in a new journal from then on, and the old one is deleted once the round's batches
are in Postgres or a spill file. So a journal holds a second or two of rows, not days, also
under a load that never lets the writer catch up; and a round costs one file begun, one fsync and
one Postgres commit, however many requests it writes.

A journal is written in parts, `journal-<pid>-<journal id>-<part>.jsonl` in the audit folder,
0600: an fsync seals the part it makes durable, and appends go on in a new one. Appending to a
file while it is being fsynced can wait for the disk (measured here: 20 ms stalls of the event
loop), appending next to it does not. Each part starts with a header (the journal's id, the
part's number, the columns); then come rows as JSON arrays in those columns' order (the time in
microseconds since 1970, UTC) and markers `{"batch", "rows"}`, whose rows may be in earlier
parts. The writer holds a lock on part 0 for the journal's life. A journal whose process died is
replayed (all its parts, in order) at the next start, or by any live writer that finds it; a
last line cut short by the kill belongs to an answer never completed and is skipped. Part 0 is
deleted first, so parts without a part 0 are what was left of a journal deleted once caught up:
they go without a replay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from proxy.audit.files import claim, lock, open_private, private_folder
from proxy.audit.row import COLUMNS, AuditRow
from proxy.audit.spill import UNREADABLE, Batch, Claim, stored_row

log = logging.getLogger(__name__)

SYNC_SECONDS = 1.0  # what a machine crash may lose; a killed process loses nothing
TAIL_BATCH_ROWS = 1000  # unmarked rows replayed per batch (fixed: their ids derive from it)


# A row is encoded as a JSON array, its time as whole microseconds since 1970 (UTC): ~3.5 us a
# row here with the standard library's encoder (~1 us with orjson), where an ISO string took
# 5.5 us and a `default=` hook for datetimes 7.5 us.
_CREATED = COLUMNS.index("created_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Journal:
    """This process's journal; `append` is the request path's part, the rest the writer's."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._id: uuid.UUID | None = None  # None: no journal begun since the last catch-up
        self._parts: list[Path] = []  # every part of this journal, in order
        self._anchor: int | None = None  # part 0, held open for its lock
        self._fd: int | None = None  # the part appends go to; None: begin one at the next
        # Journals ended by `sync(new_journal=True)` whose rows are on their way to Postgres:
        # each one's parts and its part 0's descriptor (its lock), deleted by `retire`.
        self._retiring: list[tuple[list[Path], int | None]] = []
        self._dirty = False  # the current part has lines not yet fsynced
        # A write (or beginning a part) failed: the journal is gone and nothing more is
        # journaled until the writer catches up, when a new one is tried. Rows wait in
        # memory only meanwhile.
        self._broken = False
        self._failing = False  # said so in the log, and not yet that it works again
        self._folder_ready = False
        self.failures = 0
        self.synced_at = 0.0  # monotonic time of the last fsync begun
        self.syncs = 0  # fsyncs done of lines not yet durable (one per part sealed)

    def append(self, row: AuditRow) -> None:
        """Journal a finished request's row; one `write`, never raises."""
        try:
            values = tuple(row)
            at = (row.created_at - _EPOCH) // _MICROSECOND
            line = orjson.dumps((*values[:_CREATED], at, *values[_CREATED + 1 :])) + b"\n"
        except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot hold: this row stays
            self.failures += 1  # in memory only, and the journal goes on
            log.error("cannot journal the audit row of request %s: %s", row.request_id, exc)
            return
        self._write(line)

    def mark(self, batch_id: uuid.UUID, rows: int) -> None:
        """The next `rows` unbatched rows form batch `batch_id` (before it is sent anywhere)."""
        self._write(orjson.dumps({"batch": str(batch_id), "rows": rows}) + b"\n")

    def _write(self, data: bytes) -> None:
        if self._broken or (self._fd is None and not self._begin_part()):
            return
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._fail(f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        self._dirty = True
        if written != len(data):  # the disk is full: the line is torn
            self._fail("the disk took only part of a line")

    def _begin_part(self) -> bool:
        if self._id is None:
            self._id = uuid.uuid4()
        number = len(self._parts)
        path = self._folder / f"journal-{os.getpid()}-{self._id.hex}-{number:06d}.jsonl"
        try:
            if not self._folder_ready:  # once, not at every part
                private_folder(self._folder)
                self._folder_ready = True
            if number == 0:
                # Locked before it has the name replays look for, or one could take it first.
                fresh = path.with_name(f".{path.name}.new")
                fd = open_private(fresh, new=True)
                lock(fd)
                fresh.rename(path)
                self._anchor = fd
            else:
                fd = open_private(path, new=True)
        except OSError as exc:
            self._folder_ready = False  # made again next time, if it was removed
            self._fail(f"{type(exc).__name__}: {exc.strerror or exc}", path)
            return False
        self._parts.append(path)
        self._fd = fd
        header = {
            "journal": str(self._id), "part": number, "columns": COLUMNS,
            "created_at": "microseconds since 1970-01-01 UTC",
        }  # fmt: skip
        self._write(orjson.dumps(header) + b"\n")
        if self._failing and not self._broken:
            self._failing = False
            log.warning("audit rows are journaled again, in %s", path)
        return not self._broken

    def _fail(self, reason: str, path: Path | None = None) -> None:
        self.failures += 1
        shown = path or (self._parts[-1] if self._parts else self._folder)
        # Batches formed from now on get no marker, so a replay of this journal could write
        # their rows twice: it goes (its rows are in memory too).
        self._discard()
        self._broken = True
        if not self._failing:
            self._failing = True
            log.error(
                "cannot write the audit journal %s (%s); audit rows wait in memory only, "
                "where a killed proxy would lose them, until a new journal can be written",
                shown,
                reason,
            )

    def _seal(self) -> int | None:
        """End the current part, if it has lines not yet durable; a descriptor to fsync it."""
        self.synced_at = time.monotonic()
        if self._fd is None or not self._dirty:
            return None
        fd, self._fd, self._dirty = self._fd, None, False
        # Part 0's descriptor holds the journal's lock: fsync a duplicate of it.
        return os.dup(fd) if fd == self._anchor else fd

    async def sync(self, new_journal: bool = False) -> None:
        """Make what was written durable, on a worker thread; appends go on in a new part, or
        with `new_journal` in a new journal (this one to be deleted by `retire`)."""
        part = self._parts[-1] if self._parts else None
        try:
            fd = self._seal()
            if new_journal:
                self._end()
            if fd is not None:
                await asyncio.to_thread(_fsync_and_close, fd)
                self.syncs += 1
        except OSError as exc:
            log.error("cannot fsync the audit journal %s (%s)", part, exc)

    def sync_now(self) -> None:
        """`sync` on the event loop's thread, for the rare step that must not let go of it."""
        part = self._parts[-1] if self._parts else None
        try:
            fd = self._seal()
            if fd is not None:
                _fsync_and_close(fd)
                self.syncs += 1
        except OSError as exc:
            log.error("cannot fsync the audit journal %s (%s)", part, exc)

    def _end(self) -> None:
        """Appends go on in a new journal; this one waits for `retire`, its lock held."""
        if self._id is None:
            return
        if self._fd is not None and self._fd != self._anchor:
            os.close(self._fd)  # sealed by `_seal` unless nothing was written since the last
        self._retiring.append((self._parts, self._anchor))
        self._id, self._parts, self._fd, self._anchor, self._dirty = None, [], None, None, False

    def retire(self) -> None:
        """Every row of the journals ended so far is in Postgres or a spill file: they go."""
        for parts, anchor in self._retiring:
            for path in parts:  # part 0 first, as in `_discard`
                path.unlink(missing_ok=True)
            if anchor is not None:
                os.close(anchor)
        self._retiring = []

    def caught_up(self) -> None:
        """Every row journaled so far is in Postgres or a spill file: the journal may go."""
        self._broken = False  # the next row tries a new journal
        self._discard()
        self.retire()

    def _discard(self) -> None:
        # Part 0 first: a replay that finds the rest (if this is cut short) knows it was done.
        for path in self._parts:
            path.unlink(missing_ok=True)
        self._let_go()
        self._parts = []

    def _let_go(self) -> None:
        for fd in {self._fd, self._anchor} - {None}:
            assert fd is not None
            os.close(fd)
        self._id, self._fd, self._anchor, self._dirty = None, None, None, False

    def close(self) -> None:
        """Stop journaling. Call it caught up: a journal with rows left stays for the next start."""
        self._let_go()
        self._parts = []
        for _, anchor in self._retiring:  # not retired: their rows may not be written
            if anchor is not None:
                os.close(anchor)
        self._retiring = []


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NAME = re.compile(r"^(journal-\d+-[0-9a-f]{32})-(\d{6})\.jsonl$")


def claims(folder: Path, on_kept: Callable[[], None]) -> Iterator[Claim]:
    """Each journal no live writer holds (its process died), locked, for replay."""
    if not folder.exists():
        return
    for fresh in folder.glob(".journal-*.jsonl.new"):  # its writer died before it was named
        if (handle := claim(fresh)) is not None:
            fresh.unlink(missing_ok=True)
            handle.close()
    journals: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("journal-*.jsonl")):
        if match := _NAME.match(path.name):
            journals.setdefault(match.group(1), []).append(path)
    for name, parts in journals.items():
        if parts[0].name != f"{name}-000000.jsonl":
            for path in parts:  # its writer caught up and was deleting it as it died
                path.unlink(missing_ok=True)
            continue
        anchor = claim(parts[0])
        if anchor is None:
            continue  # a live writer's
        handles = [anchor]
        try:
            handles += [path.open("r", encoding="utf-8", errors="replace") for path in parts[1:]]
        except FileNotFoundError:  # replayed and deleted by another writer meanwhile
            for handle in handles:
                handle.close()
            continue
        yield Claim(parts, handles, _journal_batches, on_kept)


def _journal_batches(journal: Claim) -> Iterator[Batch]:
    """The batches a dead writer had formed, with their ids; then the rows it had not batched."""
    columns: list[str] | None = None
    journal_id = uuid.uuid5(uuid.NAMESPACE_URL, journal.paths[0].name)  # until the header says
    waiting: deque[AuditRow] = deque()
    last = journal.paths[-1]
    for path, number, line in journal.lines():
        if not line.endswith("\n") and path == last:
            log.warning(
                "the last line of audit journal %s was cut short by the process's end; it "
                "belongs to an answer that was never completed",
                path,
            )
            break
        try:
            record = json.loads(line)
            if isinstance(record, list):
                if columns is None:
                    raise ValueError("a row before the header")
                stored = dict(zip(columns, record, strict=True))
                stored["created_at"] = _EPOCH + stored["created_at"] * _MICROSECOND
                waiting.append(stored_row(stored))
            elif "journal" in record:
                journal_id, columns = uuid.UUID(record["journal"]), list(record["columns"])
            else:
                batch_id, count = uuid.UUID(record["batch"]), int(record["rows"])
                if not 0 < count <= len(waiting):
                    raise ValueError(f"a batch of {count} rows with {len(waiting)} waiting")
                yield batch_id, [waiting.popleft() for _ in range(count)]
        except UNREADABLE:
            journal.unreadable(path, number)
    part = 0
    while waiting:
        count = min(TAIL_BATCH_ROWS, len(waiting))
        yield uuid.uuid5(journal_id, f"tail-{part}"), [waiting.popleft() for _ in range(count)]
        part += 1
