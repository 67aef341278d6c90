"""The audit journal: each finished request's row is on disk before its answer is complete.

`AuditWriter.submit` appends the row to this process's journal with one plain `write`, which the
kernel keeps when the process is killed; the request path never waits for the disk. An `fsync`
about once a second, on a worker thread, bounds what a machine crash can lose.

When the writer forms a batch it appends a marker naming the batch's id and size, and makes it
durable, before the batch may reach Postgres or a spill file. So a replay gives each batch the
id it had, and a batch Postgres committed just before the process died is not written twice
(batch ids are recorded with their rows: `proxy.audit.writer`). Rows after the last marker were
never sent; a replay writes them under ids derived from the journal's, the same at every replay.
Once the writer has caught up (every row in Postgres or a spill file) it deletes the journal
and begins a new one at the next row, so a journal holds seconds of rows, not days.

A file is `journal-<pid>-<uuid>.jsonl` in the audit folder, 0600: a header line (its id and the
columns), then rows as JSON arrays in those columns' order, and markers `{"batch", "rows"}`.
A journal whose process died is replayed at the next start, or by any live writer that finds
it; a last line the kill cut short belongs to an answer never completed and is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from proxy.audit.files import claim, lock, open_private, private_folder
from proxy.audit.row import COLUMNS, AuditRow
from proxy.audit.spill import UNREADABLE, Batch, Claim, stored_row

log = logging.getLogger(__name__)

SYNC_SECONDS = 1.0  # what a machine crash may lose; a killed process loses nothing
TAIL_BATCH_ROWS = 1000  # unmarked rows replayed per batch (fixed: their ids derive from it)
_PATTERN = "journal-*.jsonl"


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


# A row is a tuple: encoded as an array, the datetime as ISO text (measured: ~6 us a row).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_iso)


class Journal:
    """This process's journal; `append` is the request path's part, the rest the writer's."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fd: int | None = None
        self._path: Path | None = None
        self._rows = 0  # rows in the current file
        self._dirty = False  # written to since the last fsync
        # A write (or opening a file) failed: the file is gone and nothing more is journaled
        # until the writer catches up, when a new file is tried. Rows wait in memory only.
        self._broken = False
        self._failing = False  # said so in the log, and not yet that it works again
        self._folder_ready = False
        self.failures = 0

    def append(self, row: AuditRow) -> None:
        """Journal a finished request's row; one `write`, never raises."""
        try:
            line = _ENCODER.encode(row) + "\n"
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold: this row stays
            self.failures += 1  # in memory only, and the journal goes on
            log.error("cannot journal the audit row of request %s: %s", row.request_id, exc)
            return
        self._write(line)
        self._rows += 1

    def mark(self, batch_id: uuid.UUID, rows: int) -> None:
        """The next `rows` unbatched rows form batch `batch_id` (before it is sent anywhere)."""
        self._write(json.dumps({"batch": str(batch_id), "rows": rows}) + "\n")

    def _write(self, line: str) -> None:
        if self._broken or (self._fd is None and not self._open()):
            return
        assert self._fd is not None
        data = line.encode()
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._fail(f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        self._dirty = True
        if written != len(data):  # the disk is full: the line is torn, so the file ends here
            self._fail("the disk took only part of a line")

    def _open(self) -> bool:
        journal_id = uuid.uuid4()
        path = self._folder / f"journal-{os.getpid()}-{journal_id.hex}.jsonl"
        try:
            if not self._folder_ready:  # once, not at every new journal
                private_folder(self._folder)
                self._folder_ready = True
            fd = open_private(path, new=True)
        except OSError as exc:
            self._folder_ready = False  # made again next time, if it was removed
            self._fail(f"{type(exc).__name__}: {exc.strerror or exc}", path)
            return False
        lock(fd)
        self._fd, self._path, self._rows = fd, path, 0
        self._write(json.dumps({"journal": str(journal_id), "columns": COLUMNS}) + "\n")
        if self._failing and not self._broken:
            self._failing = False
            log.warning("audit rows are journaled again, in %s", path)
        return not self._broken

    def _fail(self, reason: str, path: Path | None = None) -> None:
        self.failures += 1
        self._broken = True
        if self._fd is not None and self._path is not None:
            # Batches formed from now on get no marker here, so a replay of this file could
            # write their rows twice: it goes (its rows are in memory too), while still locked.
            self._path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd, self._dirty = None, False
        if not self._failing:
            self._failing = True
            log.error(
                "cannot write the audit journal %s (%s); audit rows wait in memory only, "
                "where a killed proxy would lose them, until a new journal can be written",
                path or self._path,
                reason,
            )

    async def sync(self) -> None:
        """Make what was written durable, on a worker thread (the event loop never waits)."""
        if self._fd is None or not self._dirty:
            return
        self._dirty = False
        try:
            # A duplicate of the descriptor: the writer may close ours meanwhile (`caught_up`).
            await asyncio.to_thread(_fsync_and_close, os.dup(self._fd))
        except OSError as exc:
            self._dirty = True
            log.error("cannot fsync the audit journal %s (%s)", self._path, exc)

    def sync_now(self) -> None:
        """`sync` on the event loop's thread, for the rare step that must not let go of it."""
        if self._fd is not None and self._dirty:
            self._dirty = False
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._dirty = True
                log.error("cannot fsync the audit journal %s (%s)", self._path, exc)

    def caught_up(self) -> None:
        """Every row journaled so far is in Postgres or a spill file: this file may go."""
        self._broken = False  # the next row tries a new file
        if self._fd is None or self._rows == 0:
            return
        assert self._path is not None
        # Deleted while still locked, so no other writer can claim it between close and unlink.
        self._path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd, self._path, self._dirty = None, None, False

    def close(self) -> None:
        """Stop journaling. Call it caught up: a file with rows left stays for the next start."""
        if self._fd is not None:
            if self._rows == 0 and self._path is not None:
                self._path.unlink(missing_ok=True)  # a header alone
            os.close(self._fd)
            self._fd = None


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claims(folder: Path, on_kept: Callable[[], None]) -> Iterator[Claim]:
    """Each journal no live writer holds (its process died), locked, for replay."""
    paths = sorted(folder.glob(_PATTERN)) if folder.exists() else []
    for path in paths:
        handle = claim(path)
        if handle is not None:
            yield Claim(path, handle, _journal_batches, on_kept)


def _journal_batches(journal: Claim) -> Iterator[Batch]:
    """The batches a dead writer had formed, with their ids; then the rows it had not batched."""
    columns: list[str] | None = None
    journal_id = uuid.uuid5(uuid.NAMESPACE_URL, journal.path.name)  # until the header says
    waiting: deque[AuditRow] = deque()
    for number, line in enumerate(journal.handle, 1):
        if not line.endswith("\n"):
            log.warning(
                "the last line of audit journal %s was cut short by the process's end; it "
                "belongs to an answer that was never completed",
                journal.path,
            )
            break
        try:
            record = json.loads(line)
            if isinstance(record, list):
                if columns is None:
                    raise ValueError("a row before the header")
                waiting.append(stored_row(dict(zip(columns, record, strict=True))))
            elif "journal" in record:
                journal_id, columns = uuid.UUID(record["journal"]), list(record["columns"])
            else:
                batch_id, count = uuid.UUID(record["batch"]), int(record["rows"])
                if not 0 < count <= len(waiting):
                    raise ValueError(f"a batch of {count} rows with {len(waiting)} waiting")
                yield batch_id, [waiting.popleft() for _ in range(count)]
        except UNREADABLE:
            journal.unreadable(number)
    part = 0
    while waiting:
        count = min(TAIL_BATCH_ROWS, len(waiting))
        yield uuid.uuid5(journal_id, f"tail-{part}"), [waiting.popleft() for _ in range(count)]
        part += 1
