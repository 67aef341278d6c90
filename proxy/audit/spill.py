"""Spill files: where audit rows wait, on disk, while Postgres is unreachable.

Each writer appends to a file of its own (`spill-<pid>-<ns>.jsonl`, one JSON line per batch, batch
ids kept, fsynced) and holds an exclusive `flock` on it while it may still append. Any writer may
replay a file it can lock: its own once it lets go, or one left by a process that has exited
(see `proxy.audit.files`). Replaying the same batch twice is harmless, since batch ids make
writes exactly-once (see `proxy.audit.writer`).

Rows are stored by column name, so a file written before a schema change still reads after it
(a column it lacks is empty; files of the first format, rows as lists, read by position). A file
with a line that cannot be read is never deleted: it is renamed `*.unreadable`, reported, and
left for an operator, while the lines that could be read are replayed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from proxy.audit.files import claim, lock, open_private, private_folder
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


def stored_row(stored: object) -> AuditRow:
    """A row as a file keeps it (by column name; or by position, the first format) as a row."""
    if isinstance(stored, list):  # the first format: values in the columns' order of then
        stored = dict(zip(COLUMNS, stored, strict=False))
    if not isinstance(stored, dict):
        raise TypeError("a row is neither an object nor a list")
    fields = {name: stored[name] for name in COLUMNS if name in stored}
    created = fields["created_at"]
    if not isinstance(created, datetime):
        fields["created_at"] = datetime.fromisoformat(str(created))
    return AuditRow(**fields)


# What a line that cannot be read raises while it is decoded.
UNREADABLE = (ValueError, KeyError, TypeError, IndexError)


def _spilled_batches(claim: Claim) -> Iterator[Batch]:
    for path, number, line in claim.lines():
        try:
            record = json.loads(line)
            batch = uuid.UUID(record["batch"]), [stored_row(row) for row in record["rows"]]
        except UNREADABLE:
            claim.unreadable(path, number)
            continue
        yield batch


@dataclass
class Claim:
    """Files of rows this writer holds (the first file's lock), to replay and then delete."""

    paths: list[Path]
    handles: list[IO[str]]
    decode: Callable[[Claim], Iterator[Batch]]  # the files' batches, in their format
    on_kept: Callable[[], None]  # counts files kept for an operator
    unreadable_lines: int = 0

    def batches(self) -> Iterator[Batch]:
        return self.decode(self)

    def lines(self) -> Iterator[tuple[Path, int, str]]:
        """Each line of each file in turn, with its file and number."""
        for path, handle in zip(self.paths, self.handles, strict=True):
            for number, line in enumerate(handle, 1):
                yield path, number, line

    def unreadable(self, path: Path, number: int) -> None:
        self.unreadable_lines += 1
        log.error("line %d of audit file %s cannot be read", number, path)

    def done(self) -> None:
        """Every readable batch is in Postgres: delete the files (the first first), or keep
        them for an operator if a line could not be read."""
        if self.unreadable_lines:
            for path in self.paths:
                path.rename(path.with_name(path.name + ".unreadable"))
            self.on_kept()
            log.error(
                "audit file %s had %d unreadable lines; the rest is written, the file "
                "is kept as %s.unreadable for an operator",
                self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (and parts)",
                self.unreadable_lines,
                self.paths[0].name,
            )
        else:
            for path in self.paths:
                path.unlink(missing_ok=True)
            log.warning("replayed audit file %s", self.paths[0])
        self.release()

    def release(self) -> None:
        for handle in self.handles:
            handle.close()


class SpillFiles:
    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._own: IO[str] | None = None
        self._own_path: Path | None = None
        self.unreadable = 0  # files kept because a line could not be read

    def append(self, batches: Sequence[Batch]) -> None:
        if self._own is None:
            private_folder(self._folder)
            self._own_path = self._folder / f"spill-{os.getpid()}-{time.time_ns()}.jsonl"
            fd = open_private(self._own_path, new=True)
            lock(fd)
            self._own = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed by release()
        self._own.writelines(_encode(batch) for batch in batches)
        self._own.flush()
        os.fsync(self._own.fileno())
        log.warning(
            "spilled %d audit rows to %s", sum(len(rows) for _, rows in batches), self._own_path
        )

    def reject(self, row: AuditRow, reason: str) -> Path:
        """Keep a row Postgres refuses where an operator can read it; it is not replayed."""
        path = private_folder(self._folder) / "rejected.jsonl"
        line = json.dumps({"reason": reason, "row": _fields(row)}) + "\n"
        fd = open_private(path)
        try:
            os.write(fd, line.encode("utf-8", "backslashreplace"))
            os.fsync(fd)  # its journal lines go once it is written: this is its only copy
        finally:
            os.close(fd)
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
            handle = claim(path)
            if handle is not None:
                yield Claim([path], [handle], _spilled_batches, self.count_kept)

    def count_kept(self) -> None:
        """One more file kept for an operator (a spill file or a journal)."""
        self.unreadable += 1
