"""Spill files: where audit rows wait, on disk, while Postgres is unreachable.

Each writer appends to a file of its own (`spill-<pid>-<ns>.jsonl`, one JSON line per batch, batch
ids kept, fsynced) and holds an exclusive `flock` on it while it may still append. Any writer may
replay a file it can lock: its own once it lets go, or one left by a process that has exited
(the kernel drops a dead process's locks, whatever its pid is later reused for). Replaying the
same batch twice is harmless, since batch ids make writes exactly-once (see `proxy.audit.writer`).
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

from proxy.audit.row import AuditRow

log = logging.getLogger(__name__)

Batch = tuple[uuid.UUID, list[AuditRow]]


def _encode(batch: Batch) -> str:
    batch_id, rows = batch
    encoded = []
    for row in rows:
        encoded.append([*row[:1], row.created_at.isoformat(), *row[2:]])
    return json.dumps({"batch": str(batch_id), "rows": encoded}) + "\n"


def _decode(line: str) -> Batch:
    record = json.loads(line)
    rows = []
    for values in record["rows"]:
        values[1] = datetime.fromisoformat(values[1])
        rows.append(AuditRow(*values))
    return uuid.UUID(record["batch"]), rows


@dataclass
class Claim:
    """A spill file this writer holds the lock of, to replay and then delete."""

    path: Path
    handle: IO[str]

    def batches(self) -> Iterator[Batch]:
        for number, line in enumerate(self.handle, 1):
            try:
                yield _decode(line)
            except (ValueError, KeyError, TypeError, IndexError):
                # Only a crash mid-append leaves a torn line; its rows were never acknowledged.
                log.error("skipping unreadable line %d of audit spill file %s", number, self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()
        log.warning("replayed audit spill file %s", self.path)

    def release(self) -> None:
        self.handle.close()


class SpillFiles:
    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._own: IO[str] | None = None
        self._own_path: Path | None = None

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

    def reject(self, rows: Sequence[AuditRow], reason: str) -> Path:
        """Keep rows Postgres refuses where an operator can read them; they are not replayed."""
        self._folder.mkdir(parents=True, exist_ok=True)
        path = self._folder / "rejected.jsonl"
        with path.open("a", encoding="utf-8") as handle:
            for row in rows:
                values = [*row[:1], row.created_at.isoformat(), *row[2:]]
                handle.write(json.dumps({"reason": reason, "row": values}) + "\n")
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
            yield Claim(path, handle)
