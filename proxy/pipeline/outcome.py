"""What happened to one request: the facts its audit row is made of, and its one final status.

Each fact has one writer: the body reader counts `bytes_in`, the fair queue `queue_ms` and
`backend`, the reply that turns the backend's answer into the client's the rest; the pipeline
records an error answer. None of them decides the status the request ends with:
`final_status()` does, from what the client actually received. A stream the client read to its
last event is a 200 however quickly the client hangs up after it; one it left before the end is a
499; one the backend broke off is a 502, whatever status its headers had.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer was complete"
BACKEND_BROKE_OFF = 502


@dataclass(eq=False)
class Outcome:
    status: int = 0  # of the response the client was (or was being) sent
    complete: bool = False  # the client received the whole answer
    client_left: bool = False  # the client went away, or stopped reading
    broken: bool = False  # the backend broke its answer off half-way
    error: str | None = None  # short, safe to store: never a key or a body
    bytes_in: int = 0
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, served from the backend's prompt cache
    queue_ms: float | None = None  # waiting for a backend slot (the scheduler's share)
    backend: str | None = None  # the backend that served it
    ttfb_ms: float | None = None  # until the first answer event (or body byte) from the backend

    def final_status(self) -> int:
        if self.complete:
            return self.status
        if self.broken:
            return BACKEND_BROKE_OFF
        if self.client_left:
            return CLIENT_CLOSED
        return self.status or 500

    def note_error(self, text: str) -> None:
        """Keep the first explanation: later ones are consequences of it."""
        if self.error is None:
            self.error = text[:200]

    def left(self) -> None:
        """The client went away before its answer was complete."""
        if not self.complete:
            self.client_left = True
            self.note_error("client closed the connection")

    def count(self, prompt: int | None, completion: int | None) -> None:
        """Take token counts (running or final) from the backend's usage."""
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion
