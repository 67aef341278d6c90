"""Prometheus metrics, fed from each finished request's record, served on their own listener.

Each application has its own `CollectorRegistry` (no process-global state), filled by a
completion hook and a small in-flight middleware, and served by a separate aiohttp site that
binds LLAMA_PROXY_METRICS_HOST:LLAMA_PROXY_METRICS_PORT (loopback by default), never the public
listener. Label values are bounded: routes are the known API paths or "other", and per-user
token counters stop adding users past `MAX_USER_LABELS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from proxy.pipeline.records import RequestRecord

ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/models",
    }
)
MAX_USER_LABELS = 500
# Local inference spans milliseconds (errors, cached answers) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _BacklogCollector(Collector):
    """Gauges read at scrape time from the audit writer."""

    def __init__(self, backlog: Callable[[], int], spilled_bytes: Callable[[], int]) -> None:
        self._backlog = backlog
        self._spilled = spilled_bytes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "llama_gate_audit_backlog_rows",
            "Audit rows accepted but not yet written to Postgres or a spill file.",
            value=self._backlog(),
        )
        yield GaugeMetricFamily(
            "llama_gate_audit_spill_bytes",
            "Bytes of audit rows waiting in spill files for Postgres to return.",
            value=self._spilled(),
        )


class Metrics:
    def __init__(self) -> None:
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
            "llama_gate_upstream_duration_seconds", "From calling the backend to its last byte.",
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
        self._users: set[str] = set()

    def watch_audit(self, backlog: Callable[[], int], spilled_bytes: Callable[[], int]) -> None:
        self.registry.register(_BacklogCollector(backlog, spilled_bytes))

    def observe(self, record: RequestRecord) -> None:
        """The completion hook: count one finished request."""
        route = record.path if record.path in ROUTES else "other"
        self.requests.labels(route, str(record.status)).inc()
        if record.duration_ms is not None:
            self.duration.labels(route).observe(record.duration_ms / 1000)
        if record.upstream_ms is not None:
            self.upstream.labels(route).observe(record.upstream_ms / 1000)
        if record.ttfb_ms is not None:
            self.ttfb.labels(route).observe(record.ttfb_ms / 1000)
        if record.queue_ms is not None:
            self.queue.observe(record.queue_ms / 1000)
        if record.status == 429:
            self.rate_limited.inc()
        elif record.status == 401:
            self.auth_failures.inc()
        if record.username and (record.prompt_tokens or record.completion_tokens):
            user = self._user_label(record.username)
            self.tokens.labels(user, "prompt").inc(record.prompt_tokens or 0)
            self.tokens.labels(user, "completion").inc(record.completion_tokens or 0)

    def _user_label(self, username: str) -> str:
        if username in self._users or len(self._users) < MAX_USER_LABELS:
            self._users.add(username)
            return username
        return "other"

    def middleware(self, skip_paths: frozenset[str]) -> Middleware:
        @web.middleware
        async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in skip_paths:
                return await handler(request)
            with self.in_flight.track_inprogress():
                return await handler(request)

        return count_in_flight

    async def handle(self, _request: web.Request) -> web.Response:
        """GET /metrics in Prometheus' text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    return app
