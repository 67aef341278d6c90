"""Where requests go: the backends, and the choice of one for each request.

`Backends.acquire` is the seam for the fair-share scheduler and for several backends: it is an
async context manager held for the whole exchange, stream included, so a scheduler can hand out
a backend slot (after a fair wait, recorded as `queue_ms`) and take it back when the response
ends however it ends. Today there is one backend, from LLAMA_SERVER_HOST/PORT, and no waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from yarl import URL

from proxy.records import RequestRecord
from proxy.settings import Secret, Settings


@dataclass(frozen=True)
class Upstream:
    name: str
    host: str
    port: int
    api_key: Secret  # the internal backend key: only the proxy can use the backend

    def url(self, raw_path: str, raw_query: str) -> URL:
        return URL.build(
            scheme="http",
            host=self.host,
            port=self.port,
            path=raw_path,
            query_string=raw_query,
            encoded=True,
        )

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - one budget per probe
        """None if a TCP connection opens, else why not.

        A connection, not an HTTP request: every API route of llama_cpp.server (even /v1/models)
        waits for its model lock, so a readiness probe would queue behind a long generation.
        """
        try:
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return f"no connection within {timeout:g} s"
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        writer.close()
        await writer.wait_closed()
        return None


class Backends:
    """Chooses a backend for each request."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        if not upstreams:
            raise ValueError("at least one backend is needed")
        self._upstreams = tuple(upstreams)

    @classmethod
    def from_settings(cls, settings: Settings) -> Backends:
        key = settings.server_api_key
        return cls([Upstream("default", settings.server_host, settings.server_port, key)])

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    @asynccontextmanager
    async def acquire(self, record: RequestRecord) -> AsyncIterator[Upstream]:
        """Hold a backend for one request (`record` says who asks, for which model)."""
        waited_from = time.monotonic()
        upstream = self._upstreams[0]
        record.queue_ms = (time.monotonic() - waited_from) * 1000.0
        record.upstream = upstream.name
        yield upstream

    async def probe(self, timeout: float) -> dict[str, str | None]:  # noqa: ASYNC109
        """Each backend's name and None when reachable, else the reason."""
        results = await asyncio.gather(*(u.probe(timeout) for u in self._upstreams))
        return {u.name: result for u, result in zip(self._upstreams, results, strict=True)}
