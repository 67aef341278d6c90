"""Spill files: where audit rows wait, on disk, while Postgres is unreachable.

Each writer appends to a file of its own (`spill-<pid>-<ns>.jsonl`, one JSON line per batch, batch
ids kept, fsynced) and holds an exclusive `flock` on it while it may still append. Any writer may
replay a file it can lock: its own once it lets go, or one left by a process that has exited
(the kernel drops a dead process's locks, whatever its pid is later reused for). Replaying the
same batch twice is harmless, since batch ids make writes exactly-once (see `proxy.audit.writer`).

Rows are stored by column name, so a file written before a schema change still reads after it
(a column it lacks is empty; files of the first format, rows as lists, read by position). A file
with a line that cannot be read is never deleted: it is renamed `*.unreadable`, reported, and
left for an operator, while the lines that could be read are replayed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from proxy.audit.row import COLUMNS, AuditRow

log = logging.getLogger(__name__)

Batch = tuple[uuid.UUID, list[AuditRow]]


def _fields(row: AuditRow) -> dict[str, object]:
    fields = row._asdict()
    fields["created_at"] = row.created_at.isoformat()
    return fields


def _encode(batch: Batch) -> str:
    batch_id, rows = batch
    return json.dumps({"batch": str(batch_id), "rows": [_fields(row) for row in rows]}) + "\n"


def _row(stored: object) -> AuditRow:
    if isinstance(stored, list):  # the first format: values in the columns' order of then
        stored = dict(zip(COLUMNS, stored, strict=False))
    if not isinstance(stored, dict):
        raise TypeError("a row is neither an object nor a list")
    fields = {name: stored[name] for name in COLUMNS if name in stored}
    fields["created_at"] = datetime.fromisoformat(str(fields["created_at"]))
    return AuditRow(**fields)


def _decode(line: str) -> Batch:
    record = json.loads(line)
    return uuid.UUID(record["batch"]), [_row(stored) for stored in record["rows"]]


@dataclass
class Claim:
    """A spill file this writer holds the lock of, to replay and then delete."""

    path: Path
    handle: IO[str]
    files: SpillFiles
    unreadable_lines: int = 0

    def batches(self) -> Iterator[Batch]:
        for number, line in enumerate(self.handle, 1):
            try:
                batch = _decode(line)
            except (ValueError, KeyError, TypeError, IndexError):
                self.unreadable_lines += 1
                log.error("line %d of audit spill file %s cannot be read", number, self.path)
                continue
            yield batch

    def done(self) -> None:
        """Every readable batch is in Postgres: delete the file, or keep it if it had others."""
        if self.unreadable_lines:
            kept = self.path.with_name(self.path.name + ".unreadable")
            self.path.rename(kept)
            self.files.unreadable += 1
            log.error(
                "audit spill file %s had %d unreadable lines; the rest is written, the file "
                "is kept as %s for an operator",
                self.path,
                self.unreadable_lines,
                kept,
            )
        else:
            self.path.unlink(missing_ok=True)
            log.warning("replayed audit spill file %s", self.path)
        self.handle.close()

    def release(self) -> None:
        self.handle.close()


class SpillFiles:
    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._own: IO[str] | None = None
        self._own_path: Path | None = None
        self.unreadable = 0  # files kept because a line could not be read

    def append(self, batches: Sequence[Batch]) -> None:
        if self._own is None:
            self._folder.mkdir(parents=True, exist_ok=True)
            self._own_path = self._folder / f"spill-{os.getpid()}-{time.time_ns()}.jsonl"
            self._own = self._own_path.open("a", encoding="utf-8")
            fcntl.flock(self._own.fileno(), fcntl.LOCK_EX)
        self._own.writelines(_encode(batch) for batch in batches)
        self._own.flush()
        os.fsync(self._own.fileno())
        log.warning(
            "spilled %d audit rows to %s", sum(len(rows) for _, rows in batches), self._own_path
        )

    def reject(self, row: AuditRow, reason: str) -> Path:
        """Keep a row Postgres refuses where an operator can read it; it is not replayed."""
        self._folder.mkdir(parents=True, exist_ok=True)
        path = self._folder / "rejected.jsonl"
        with path.open("a", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(json.dumps({"reason": reason, "row": _fields(row)}) + "\n")
        return path

    def release(self) -> None:
        """Stop appending to our own file, so that it (and its lock) can be replayed."""
        if self._own is not None:
            self._own.close()
            self._own = None

    def paths(self) -> list[Path]:
        return sorted(self._folder.glob("spill-*.jsonl")) if self._folder.exists() else []

    def size_bytes(self) -> int:
        total = 0
        for path in self.paths():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def claims(self) -> Iterator[Claim]:
        """Each replayable file in turn, locked; our own included (it is released first)."""
        self.release()
        for path in self.paths():
            try:
                handle = path.open("r", encoding="utf-8")
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()  # a live writer still appends to it
                continue
            if os.fstat(handle.fileno()).st_nlink == 0:
                handle.close()  # replayed and deleted by someone else meanwhile
                continue
            yield Claim(path, handle, self)
