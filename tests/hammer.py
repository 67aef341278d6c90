"""A client that hammers a proxy with requests, each on a new connection, while something else
happens to it (a restart); it counts what was answered and what was refused or cut."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

# GET /health (no database), and a chat request with no key: a 401 that walks the pipeline and
# leaves an audit row.
REQUESTS = (
    b"GET /health HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
)


@dataclass
class Hammer:
    """`with Hammer(port) as hammer:` runs `clients` threads until the block ends."""

    port: int
    clients: int = 4
    pause: float = 0.02  # between one client's requests, so two cores are left for the rest
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def _one(self, request: bytes) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
                conn.sendall(request)
                head = b""
                while b"\r\n" not in head:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    head += chunk
        except OSError as exc:
            self.failures.append(f"{time.strftime('%X')} {type(exc).__name__}: {exc}")
            return
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self.failures.append(f"{time.strftime('%X')} no answer: {head[:60]!r}")
            return
        self.statuses[int(parts[1])] += 1

    def _run(self, index: int) -> None:
        sent = index
        while not self._stop.is_set():
            self._one(REQUESTS[sent % len(REQUESTS)])
            sent += 1
            time.sleep(self.pause)

    def __enter__(self) -> Hammer:
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
