"""Prometheus metrics, fed from each finished request's audit row, served on their own listener.

Each application has its own `CollectorRegistry` (no process-global state). A completion hook
and a small in-flight middleware add each request to plain numbers, which a collector lays out
as Prometheus families only when scraped: a request takes no lock and makes no sample object.
They are served by a separate aiohttp site that binds
LLAMA_PROXY_METRICS_HOST:LLAMA_PROXY_METRICS_PORT (loopback by default), never the public
listener. Label values are bounded: routes are the route table's paths or "other", and per-user
token counters stop adding users past `MAX_USER_LABELS`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


class _Histogram:
    """One histogram's counts, kept as plain numbers and laid out for Prometheus at scrape time
    (prometheus-client's own takes a lock and walks its buckets on every observation)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """The cumulative buckets as Prometheus shows them."""
        bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


@dataclass(frozen=True, slots=True)
class _Route:
    """One route's figures."""

    statuses: dict[int, int] = field(default_factory=dict)  # status -> requests
    duration: _Histogram = field(default_factory=_Histogram)
    upstream: _Histogram = field(default_factory=_Histogram)
    ttfb: _Histogram = field(default_factory=_Histogram)


class _Figures:
    """What the finished requests add up to, in plain numbers."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.routes = {name: _Route() for name in (*routes, "other")}
        self.queue = _Histogram()
        self.in_flight = 0
        self.rate_limited = 0
        self.auth_failures = 0
        self.tokens: dict[str, list[int]] = {}  # user (or "other") -> [prompt, completion]
        self.from_cache = 0
        self.processed = 0


class _RequestCollector(Collector):
    """The requests' figures, laid out as Prometheus metric families at scrape time."""

    def __init__(self, figures: _Figures) -> None:
        self._figures = figures

    def collect(self) -> Iterable[Metric]:
        figures = self._figures
        requests = CounterMetricFamily(
            "llama_gate_requests", "Requests by route and status.", labels=["route", "status"]
        )
        histograms = {
            kind: HistogramMetricFamily(name, text, labels=["route"])
            for kind, name, text in (
                ("duration", "llama_gate_request_duration_seconds",
                 "Whole request, as the client saw it."),
                ("upstream", "llama_gate_upstream_duration_seconds",
                 "From the request's turn at a backend to its end (the whole request minus its "
                 "wait)."),
                ("ttfb", "llama_gate_time_to_first_byte_seconds",
                 "Until the backend's first body byte."),
            )
        }  # fmt: skip
        for name, route in figures.routes.items():
            for status, count in route.statuses.items():
                requests.add_metric([name, str(status)], count)
            for kind, family in histograms.items():
                histogram: _Histogram = getattr(route, kind)
                family.add_metric([name], histogram.buckets(), histogram.total)
        yield requests
        yield from histograms.values()
        queue = HistogramMetricFamily(
            "llama_gate_queue_wait_seconds", "Waiting for a backend slot."
        )
        queue.add_metric([], figures.queue.buckets(), figures.queue.total)
        yield queue
        yield GaugeMetricFamily(
            "llama_gate_requests_in_flight", "API requests being served now.", figures.in_flight
        )
        yield CounterMetricFamily(
            "llama_gate_rate_limited", "Requests refused with 429 (rate, concurrency or tokens).",
            figures.rate_limited,
        )  # fmt: skip
        yield CounterMetricFamily(
            "llama_gate_auth_failures", "Requests refused with 401.", figures.auth_failures
        )
        tokens = CounterMetricFamily(
            "llama_gate_tokens", "Tokens served, by user and kind (prompt or completion).",
            labels=["user", "kind"],
        )  # fmt: skip
        for user, (prompt, completion) in figures.tokens.items():
            tokens.add_metric([user, "prompt"], prompt)
            tokens.add_metric([user, "completion"], completion)
        yield tokens
        sources = CounterMetricFamily(
            "llama_gate_prompt_tokens",
            "Prompt tokens by source: served from the backend's prompt cache, or processed.",
            labels=["source"],
        )
        sources.add_metric(["cache"], figures.from_cache)
        sources.add_metric(["processed"], figures.processed)
        yield sources


class Metrics:
    def __init__(self, routes: Iterable[str]) -> None:
        self._figures = _Figures(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_RequestCollector(self._figures))

    def watch_audit(self, writer: AuditWriter) -> None:
        self.registry.register(_AuditCollector(writer))

    def observe(self, row: AuditRow) -> None:
        """The completion hook: count one finished request."""
        figures = self._figures
        route = figures.routes.get(row.path) or figures.routes["other"]
        status = row.status_code
        route.statuses[status] = route.statuses.get(status, 0) + 1
        route.duration.observe(row.duration_ms / 1000)
        if row.queue_ms is not None:
            figures.queue.observe(row.queue_ms / 1000)
            route.upstream.observe(max(0.0, row.duration_ms - row.queue_ms) / 1000)
        if row.ttfb_ms is not None:
            route.ttfb.observe(row.ttfb_ms / 1000)
        if status == 429:
            figures.rate_limited += 1
        elif status == 401:
            figures.auth_failures += 1
        if row.username and (row.prompt_tokens or row.completion_tokens):
            counts = self._user_tokens(row.username)
            counts[0] += row.prompt_tokens or 0
            counts[1] += row.completion_tokens or 0
        if row.prompt_tokens:
            cached = min(row.cached_tokens or 0, row.prompt_tokens)
            figures.from_cache += cached
            figures.processed += row.prompt_tokens - cached

    def _user_tokens(self, username: str) -> list[int]:
        """The user's token counts ([prompt, completion]), `other`'s past MAX_USER_LABELS users."""
        tokens = self._figures.tokens
        counts = tokens.get(username)
        if counts is None:
            name = username if len(tokens) < MAX_USER_LABELS else "other"
            counts = tokens.setdefault(name, [0, 0])
        return counts

    def middleware(self, skip_paths: frozenset[str]) -> Middleware:
        figures = self._figures

        @web.middleware
        async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in skip_paths and request.method in {"GET", "HEAD"}:
                return await handler(request)
            figures.in_flight += 1
            try:
                return await handler(request)
            finally:
                figures.in_flight -= 1

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
