"""The client's side of an answer: its response opened once, every byte counted, departures noted.

A reply writes through a `Delivery`; when the client has gone, a write raises `ClientGone` (and
the outcome says the client left), so no reply needs to know how aiohttp reports a departure.
A client that stops reading is gone too: a write that cannot be handed over within
`client_timeout` seconds cuts it off, which closes the backend's connection and frees its slot.
No answer grows past `max_answer_bytes` (`AnswerTooLarge`). `finish()` ends the response and is
the one point where an answer counts as received whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from proxy.errors import AnswerTooLarge
from proxy.pipeline.outcome import Outcome

# Below the write buffer's low-water mark (16 KiB in asyncio and uvloop, a quarter of the 64 KiB
# high-water mark): written into an empty buffer, such a piece never pauses the writer.
SMALL_WRITE = 16 * 1024


class ClientGone(Exception):
    """The client went away (or stopped reading) before its answer was complete."""


class _StreamResponse(web.StreamResponse):
    """A stream whose headers wait for its first bytes (as aiohttp's `Response` does), so that
    both leave in one write; `Delivery.open` sends them alone if nothing follows at once."""

    _send_headers_immediately = False


class Delivery:
    def __init__(
        self,
        request: web.Request,
        outcome: Outcome,
        headers: dict[str, str],
        started: float,
        *,
        client_timeout: float = 30.0,
        max_answer_bytes: int = 16 << 20,
    ) -> None:
        self.request = request
        self.outcome = outcome
        self.headers = headers  # X-Request-Id and the rate-limit headers, on every answer
        self._started = started  # monotonic time the request arrived
        self._client_timeout = client_timeout
        self.max_answer_bytes = max_answer_bytes
        self.response: web.StreamResponse | None = None
        # Called once the answer is whole, before its end leaves: the ledger records its row.
        self.on_complete: Callable[[], None] | None = None

    def fork(self, outcome: Outcome, started: float) -> Delivery:
        """The same client's side for another outcome: one call of a batch, which is answered
        within the batch's answer (so this one is never opened)."""
        return Delivery(
            self.request,
            outcome,
            {},
            started,
            client_timeout=self._client_timeout,
            max_answer_bytes=self.max_answer_bytes,
        )

    def first_byte(self) -> None:
        """The backend's first answer byte (or event) arrived: time to first byte."""
        if self.outcome.ttfb_ms is None:
            self.outcome.ttfb_ms = (time.monotonic() - self._started) * 1000.0

    async def open(
        self, status: int, content_type: str, headers: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        """Send the status line and headers (a stream's answer begins)."""
        combined = CIMultiDict(headers or {})
        combined.update(self.headers)
        combined["Content-Type"] = content_type
        response = _StreamResponse(status=status, headers=combined)
        self.outcome.status = status
        self.response = response
        try:
            writer = await response.prepare(self.request)
        except ConnectionResetError:
            self.outcome.left()
            raise ClientGone from None
        if writer is not None:
            # The headers go with the first bytes written before the reply next waits (one
            # write, one wake-up of the client, for a backend that answered at once), or on
            # their own as soon as it waits for the backend.
            asyncio.get_running_loop().call_soon(_send_headers, writer)
        return response

    async def send(self, data: bytes) -> None:
        assert self.response is not None, "open() first"
        self.check_size(self.outcome.bytes_out + len(data))
        try:
            if self._cannot_wait(len(data)):
                await self.response.write(data)
            else:
                async with asyncio.timeout(self._client_timeout):
                    await self.response.write(data)
        except ConnectionResetError:
            self.outcome.left()
            raise ClientGone from None
        except TimeoutError:
            self._stopped_reading()
        self.outcome.bytes_out += len(data)

    def _cannot_wait(self, size: int) -> bool:
        """Whether writing `size` bytes now is handed over at once, with no wait for the client
        to read (so no timer need watch it, at ~5-30 us a write): nothing of earlier writes is
        still queued, and these bytes stay below where the transport pauses its writer."""
        transport = self.request.transport
        return (
            size < SMALL_WRITE
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        )

    async def finish(self) -> None:
        """The whole answer has been sent: end the response.

        Its row is made before the response's end goes out, so no client holds a complete
        answer whose row a proxy killed just then could lose. Every byte of the answer has
        been written by now: a client gone before the end of the chunked encoding had it all.
        """
        assert self.response is not None, "open() first"
        self.outcome.complete = True
        if self.on_complete is not None:
            self.on_complete()
        try:
            async with asyncio.timeout(self._client_timeout):
                await self.response.write_eof()
        except ConnectionResetError:
            raise ClientGone from None
        except TimeoutError:
            # Every byte was handed over and the row made: a client that will not take the end
            # of the chunked encoding only loses its connection.
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ClientGone from None

    async def fail(self, status: int, reason: str, last: bytes) -> None:
        """End a stream that already began with `last`, an error event in the API's own words;
        its row records `status`, the failure the client was told of."""
        self.outcome.note_error(reason)
        await self.send(last)
        self.outcome.status = status  # before finish(), which makes the row
        await self.finish()

    def check_size(self, size: int) -> None:
        """Raise `AnswerTooLarge` when an answer of `size` bytes is more than is sent."""
        if size > self.max_answer_bytes:
            raise AnswerTooLarge(self.max_answer_bytes)

    def _stopped_reading(self) -> None:
        self.outcome.note_error(
            f"client stopped reading its answer for {self._client_timeout:g} s; cut off"
        )
        self.outcome.left()
        if self.request.transport is not None:
            self.request.transport.abort()
        raise ClientGone from None

    def whole(self, status: int, body: bytes, content_type: str) -> web.Response:
        """An answer sent in one piece (aiohttp writes it once the handler returns)."""
        self.check_size(len(body))
        response = web.Response(status=status, body=body, headers=self.headers)
        response.content_type = content_type
        self.outcome.status = status
        self.outcome.bytes_out += len(body)
        self.outcome.complete = True
        return response

    def broke_off(self, reason: str) -> None:
        """The backend broke the answer off: cut the client's connection, so it sees a cut."""
        self.outcome.broken = True
        self.outcome.note_error(reason)
        if self.request.transport is not None:
            self.request.transport.close()


def _send_headers(writer: AbstractStreamWriter) -> None:
    with contextlib.suppress(ConnectionResetError):  # the client left: nothing to tell it
        writer.send_headers()
