"""Backend health: one `GET /health` per probe, which never waits for the model lock.

llama-gate's backend (`python -m backend serve`) answers `/health` at once, even during a long
generation, with `{"status": "ok", "models": [aliases], "default": alias, "limits": {alias:
{"n_ctx", "max_token_bytes", "overhead", ...}}}`: that says that it is up, which models it serves
and how large a prompt each takes (what the proxy needs to know whether a request must be
measured before its turn: `proxy.limits.prompts`). A plain llama_cpp.server has no `/health`
(every route of its own waits for the model lock); its 404 still proves it is up, and its models
and limits stay unknown, so it is sent any model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from proxy.background import background

if TYPE_CHECKING:
    from proxy.upstream.backends import Upstream


@dataclass(frozen=True)
class ModelLimits:
    """What bounds one model's prompts, as its backend says."""

    n_ctx: int  # the context: prompt and answer together
    max_token_bytes: int  # no token is longer: n bytes of text are at least n / this tokens
    overhead: int  # tokens a prompt has beyond its request's JSON bytes, at most


@dataclass(frozen=True)
class Health:
    problem: str | None = None  # None: up
    models: frozenset[str] | None = None  # None: unknown, so it may serve any model
    default: str | None = None  # the model it answers a request that names none with
    limits: Mapping[str, ModelLimits] = field(default_factory=dict)  # by model, when told

    @property
    def up(self) -> bool:
        return self.problem is None


async def probe_health(
    session: aiohttp.ClientSession,
    url: URL,
    timeout: float,  # noqa: ASYNC109 - one budget for connecting and answering
) -> Health:
    """What the backend's `/health` at `url` says, or why it could not be asked."""
    try:
        async with (
            asyncio.timeout(timeout),
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status in (404, 405):
                return Health()  # up, but not llama-gate's backend: models unknown
            if response.status != 200:
                return Health(f"/health answered HTTP {response.status}")
            try:
                body: Any = await response.json(content_type=None)
            except ValueError:
                body = None
    except TimeoutError:
        return Health(f"no answer within {timeout:g} s")
    except aiohttp.ClientConnectorError as exc:
        return Health(exc.os_error.strerror or type(exc.os_error).__name__)
    except aiohttp.ClientError as exc:
        return Health(type(exc).__name__)
    return _parse(body)


def _parse(body: Any) -> Health:
    if not isinstance(body, dict):
        return Health()
    models = body.get("models")
    default = body.get("default")
    known = (
        frozenset(models)
        if isinstance(models, list) and models and all(isinstance(m, str) for m in models)
        else None
    )
    default = default if isinstance(default, str) and known else None
    return Health(None, known, default, _limits(body.get("limits"), known or frozenset()))


def _limits(given: Any, models: frozenset[str]) -> dict[str, ModelLimits]:
    if not isinstance(given, dict):
        return {}
    limits = {}
    for model, numbers in given.items():
        if model not in models or not isinstance(numbers, dict):
            continue
        n_ctx, longest, overhead = (
            numbers.get(k) for k in ("n_ctx", "max_token_bytes", "overhead")
        )
        if (
            isinstance(n_ctx, int)
            and isinstance(longest, int)
            and isinstance(overhead, int)
            and min(n_ctx, longest, overhead) > 0
        ):
            limits[model] = ModelLimits(n_ctx, longest, overhead)
    return limits


class Prober:
    """Asks every backend's `/health`: now and then while `running`, or at once (`probe`,
    `check`). What a probe finds goes to `report` (by backend name); `after_each` runs after
    every round of the loop (to answer those whose backend stayed out too long)."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        report: Callable[[str, Health], None],
        after_each: Callable[[], None],
        interval: float,
        timeout: float,
    ) -> None:
        self._upstreams = tuple(upstreams)
        self._report = report
        self._after_each = after_each
        self._interval = interval
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Probe every backend now and every `interval` seconds while this is held."""
        # A new connection per probe: it really tests connecting, and never reuses one the
        # backend is just closing as idle (which would look like an outage).
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            self._session = session
            try:
                async with background(self._forever()):
                    yield
            finally:
                self._session = None

    async def _forever(self) -> None:
        while True:
            await self.probe(self._timeout)
            self._after_each()
            await asyncio.sleep(self._interval)

    async def probe(self, timeout: float) -> dict[str, str | None]:  # noqa: ASYNC109
        """Probe every backend now and report what they say: each one's name and None when
        up, else the reason."""
        return await self._probe(timeout, report=True)

    async def check(self, timeout: float) -> dict[str, str | None]:  # noqa: ASYNC109
        """Probe every backend now, as `probe`, but only tell: nothing is reported."""
        return await self._probe(timeout, report=False)

    async def _probe(self, timeout: float, report: bool) -> dict[str, str | None]:  # noqa: ASYNC109
        if self._session is None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                return await self._probe_with(s, timeout, report)
        return await self._probe_with(self._session, timeout, report)

    async def _probe_with(
        self,
        session: aiohttp.ClientSession,
        timeout: float,  # noqa: ASYNC109
        report: bool,
    ) -> dict[str, str | None]:
        upstreams = self._upstreams
        results = await asyncio.gather(
            *(probe_health(session, u.url("/health", ""), timeout) for u in upstreams)
        )
        if report:
            for upstream, health in zip(upstreams, results, strict=True):
                self._report(upstream.name, health)
        return {u.name: health.problem for u, health in zip(upstreams, results, strict=True)}
