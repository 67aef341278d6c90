"""Prometheus metrics, fed from each finished request's audit row, served on their own listener.

Each application has its own `CollectorRegistry` (no process-global state), filled by a
completion hook and a small in-flight middleware, and served by a separate aiohttp site that
binds LLAMA_PROXY_METRICS_HOST:LLAMA_PROXY_METRICS_PORT (loopback by default), never the public
listener. Label values are bounded: routes are the route table's paths or "other", and per-user
token counters stop adding users past `MAX_USER_LABELS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from proxy.audit.row import AuditRow
from proxy.audit.writer import AuditWriter

MAX_USER_LABELS = 500
# Local inference spans milliseconds (errors, cached answers) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _AuditCollector(Collector):
    """The audit writer's figures, read at scrape time."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    def collect(self) -> Iterable[Metric]:
        writer = self._writer
        yield GaugeMetricFamily(
            "llama_gate_audit_backlog_rows",
            "Audit rows accepted but not yet written to Postgres or a spill file.",
            value=writer.backlog,
        )
        yield GaugeMetricFamily(
            "llama_gate_audit_spill_bytes",
            "Bytes of audit rows waiting in spill files for Postgres to return.",
            value=writer.spilled_bytes(),
        )
        yield CounterMetricFamily(
            "llama_gate_audit_writer_restarts",
            "Times the audit writer failed unexpectedly and was started again (see the log).",
            value=writer.restarts,
        )
        yield CounterMetricFamily(
            "llama_gate_audit_rows_rejected",
            "Audit rows Postgres refused, kept in runtime/audit-spill/rejected.jsonl.",
            value=writer.rows_rejected,
        )
        yield GaugeMetricFamily(
            "llama_gate_audit_unreadable_spill_files",
            "Spill files kept as *.unreadable because a line could not be read.",
            value=writer.unreadable_files,
        )
        yield CounterMetricFamily(
            "llama_gate_audit_journal_failures",
            "Writes to the audit journal that failed (disk full?): rows waited in memory only.",
            value=writer.journal_failures,
        )


@dataclass(frozen=True)
class _Route:
    """One route's metric children, bound once."""

    name: str
    statuses: dict[int, Any]  # status -> its requests counter, bound at first use
    duration: Any
    upstream: Any
    ttfb: Any


class Metrics:
    def __init__(self, routes: Iterable[str]) -> None:
        self._routes = frozenset(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llama_gate_requests", "Requests by route and status.", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "llama_gate_request_duration_seconds", "Whole request, as the client saw it.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream = Histogram(
            "llama_gate_upstream_duration_seconds",
            "From the request's turn at a backend to its end (the whole request minus its wait).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "llama_gate_time_to_first_byte_seconds", "Until the backend's first body byte.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "llama_gate_queue_wait_seconds", "Waiting for a backend slot.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "llama_gate_requests_in_flight", "API requests being served now.", registry=r
        )
        self.rate_limited = Counter(
            "llama_gate_rate_limited", "Requests refused with 429 (rate, concurrency or tokens).",
            registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "llama_gate_auth_failures", "Requests refused with 401.", registry=r
        )
        self.tokens = Counter(
            "llama_gate_tokens", "Tokens served, by user and kind (prompt or completion).",
            ["user", "kind"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "llama_gate_prompt_tokens",
            "Prompt tokens by source: served from the backend's prompt cache, or processed.",
            ["source"], registry=r,
        )  # fmt: skip
        # Label children are bound once (a labels() lookup takes a lock and a dict per call).
        self._per_route = {
            name: _Route(
                name,
                {},
                self.duration.labels(name),
                self.upstream.labels(name),
                self.ttfb.labels(name),
            )
            for name in (*self._routes, "other")
        }
        self._users: dict[str, tuple[Any, Any]] = {}
        self._from_cache = self.prompt_tokens.labels("cache")
        self._processed = self.prompt_tokens.labels("processed")

    def watch_audit(self, writer: AuditWriter) -> None:
        self.registry.register(_AuditCollector(writer))

    def observe(self, row: AuditRow) -> None:
        """The completion hook: count one finished request."""
        route = self._per_route.get(row.path) or self._per_route["other"]
        counter = route.statuses.get(row.status_code)
        if counter is None:
            counter = self.requests.labels(route.name, str(row.status_code))
            route.statuses[row.status_code] = counter
        counter.inc()
        route.duration.observe(row.duration_ms / 1000)
        if row.queue_ms is not None:
            self.queue.observe(row.queue_ms / 1000)
            route.upstream.observe(max(0.0, row.duration_ms - row.queue_ms) / 1000)
        if row.ttfb_ms is not None:
            route.ttfb.observe(row.ttfb_ms / 1000)
        if row.status_code == 429:
            self.rate_limited.inc()
        elif row.status_code == 401:
            self.auth_failures.inc()
        if row.username and (row.prompt_tokens or row.completion_tokens):
            prompt, completion = self._user_counters(row.username)
            prompt.inc(row.prompt_tokens or 0)
            completion.inc(row.completion_tokens or 0)
        if row.prompt_tokens:
            cached = min(row.cached_tokens or 0, row.prompt_tokens)
            self._from_cache.inc(cached)
            self._processed.inc(row.prompt_tokens - cached)

    def _user_counters(self, username: str) -> tuple[Any, Any]:
        """The user's token counters (`other`'s past MAX_USER_LABELS users), bound once."""
        counters = self._users.get(username)
        if counters is None:
            name = username if len(self._users) < MAX_USER_LABELS else "other"
            counters = (self.tokens.labels(name, "prompt"), self.tokens.labels(name, "completion"))
            if name != "other":
                self._users[username] = counters
        return counters

    def middleware(self, skip_paths: frozenset[str]) -> Middleware:
        @web.middleware
        async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in skip_paths and request.method in {"GET", "HEAD"}:
                return await handler(request)
            with self.in_flight.track_inprogress():
                return await handler(request)

        return count_in_flight

    async def handle(self, _request: web.Request) -> web.Response:
        """GET /metrics in Prometheus' text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def metrics_app(metrics: Metrics, more: Sequence[web.RouteDef] = ()) -> web.Application:
    """`/metrics`, and `more` routes (the detailed `/ready`)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_routes(more)
    return app
