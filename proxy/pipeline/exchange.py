"""One API request from its arrival to its audit row.

The pipeline fills in who called and what they asked for; the `Outcome` holds what happened.
`row()` is the one place a finished request becomes its `llama_requests` row, and its status the
one `Outcome.final_status()` decides.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from proxy.audit.row import ERROR_TEXT_LIMIT, AuditRow, storable
from proxy.auth.cache import Principal
from proxy.pipeline.delivery import Delivery
from proxy.pipeline.outcome import Outcome

# What a client may send as X-Request-Id to see it again in its answer and in the audit log.
_CLIENT_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


def new_request_id() -> str:
    """A random version 4 UUID in hex (llama_cpp.server answers 400 to an X-Request-Id that is no
    UUID), made without `uuid.UUID`'s checks, which cost a request several microseconds."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


@dataclass(eq=False)
class Exchange:
    request_id: str  # ours, unique: the backend's X-Request-Id and the quota ledger's key
    client_request_id: str | None  # the client's X-Request-Id, recorded and returned
    method: str
    path: str  # the route's canonical path, or the path as sent for an unknown one
    client_addr: str | None
    started_at: datetime  # wall clock, for the row
    start: float = field(default_factory=time.monotonic, repr=False)
    caller: Principal | None = None
    model: str | None = None
    asks_model: bool = False  # its route asks a model (its row names one when it can)
    stream: bool | None = None
    end_user: str | None = None  # whom the client says the request is for
    outcome: Outcome = field(default_factory=Outcome)
    delivery: Delivery | None = None  # the client's side of the answer
    recorded: bool = False  # its row went to the completion hooks (it goes once)
    calls: int = 0  # calls of a batch recorded on rows of their own (then this one has none)
    prompt_tokens: int | None = None  # measured before its turn: charged if it reached a backend
    answer_budget: int | None = None  # answer tokens it may generate in all (None: as asked)
    weight: float | None = None  # its model's weight against budgets and quotas (None: not asked)
    sent: int = 0  # requests it sent to a backend

    @classmethod
    def begin(
        cls, request: web.Request, path: str, client_timeout: float, max_answer_bytes: int
    ) -> Exchange:
        given = request.headers.get("X-Request-Id", "")
        exchange = cls(
            request_id=new_request_id(),
            client_request_id=given if _CLIENT_ID_RE.match(given) else None,
            method=request.method,
            path=path,
            client_addr=request.remote,
            started_at=datetime.now(UTC),
        )
        headers = {"X-Request-Id": exchange.answer_id}
        exchange.delivery = Delivery(
            request,
            exchange.outcome,
            headers,
            exchange.start,
            client_timeout=client_timeout,
            max_answer_bytes=max_answer_bytes,
        )
        return exchange

    def call(self, method: str) -> Exchange:
        """One call of this batch request (a JSON-RPC call): the same client and caller, its own
        id, outcome and row, whose `method` names it."""
        assert self.delivery is not None
        self.calls += 1
        call = Exchange(
            request_id=new_request_id(),
            client_request_id=self.client_request_id,
            method=method,
            path=self.path,
            client_addr=self.client_addr,
            started_at=datetime.now(UTC),
            caller=self.caller,
        )
        call.delivery = self.delivery.fork(call.outcome, call.start)
        return call

    @property
    def answer_id(self) -> str:
        """The X-Request-Id of the answer: the client's own when it sent one."""
        return self.client_request_id or self.request_id

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.start) * 1000.0

    def _prompt_tokens(self) -> int | None:
        """The backend's count; else, for a request that reached one, the measured prompt (a
        backend that failed before counting still had it to read)."""
        if self.outcome.prompt_tokens is not None or self.outcome.backend is None:
            return self.outcome.prompt_tokens
        return self.prompt_tokens

    def answer_left(self) -> int | None:
        """The answer tokens this request may still have generated (None: no budget)."""
        if self.answer_budget is None:
            return None
        return self.answer_budget - (self.outcome.completion_tokens or 0)

    def row(self) -> AuditRow:
        caller, outcome = self.caller, self.outcome
        return AuditRow(
            request_id=self.request_id,
            created_at=self.started_at,
            user_id=caller.user_id if caller else None,
            username=caller.username if caller else None,
            key_id=caller.key_id if caller else None,
            method=storable(self.method, 16),
            path=storable(self.path) or "",
            model=storable(self.model),
            stream=self.stream,
            status_code=outcome.final_status(),
            duration_ms=self.elapsed_ms(),
            ttfb_ms=outcome.ttfb_ms,
            queue_ms=outcome.queue_ms,
            request_bytes=outcome.bytes_in,
            response_bytes=outcome.bytes_out,
            prompt_tokens=self._prompt_tokens(),
            completion_tokens=outcome.completion_tokens,
            client_addr=storable(self.client_addr),
            error=storable(outcome.error, ERROR_TEXT_LIMIT),
            client_request_id=storable(self.client_request_id),
            backend=storable(outcome.backend),
            end_user=storable(self.end_user),
            cached_tokens=outcome.cached_tokens,
            weight=self.weight,
        )
