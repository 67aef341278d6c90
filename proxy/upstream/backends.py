"""Where requests go: the backends, their health, and a fair turn at one for each request.

`Backends.acquire` is held for the whole exchange, stream included. Each backend serves at most
`slots` requests at once (llama_cpp.server generates for one at a time); the others wait in
per-user queues served round-robin (`proxy.upstream.fairqueue`), and their wait is the request's
`queue_ms`. There is one queue for all backends, so a free slot anywhere goes to the next eligible
request: nobody waits behind a busy backend while another idles. A request goes to a backend that
is up and serves its model; among free ones, the least loaded.

A request that continues a conversation (`proxy.upstream.affinity`) goes to the backend that most
recently served that conversation, where its state is still in the prompt cache, unless that
backend is much busier than another that could serve it: `AFFINITY_SLACK` or more requests per
slot more, counting those running and those waiting for it. Short of that the request waits for
its backend even while another idles, since reading a whole conversation again costs more than
waiting for one answer to end; past it, it goes elsewhere and the conversation moves with it.

Health comes from each backend's `/health` every `probe_interval` seconds (`prober`, a
`proxy.upstream.probes.Prober`), and from requests: a backend that refuses a connection is out
until a probe finds it back. A backend that goes out after serving is waited for,
`restart_wait` seconds (its supervisor starts the model server again within seconds): requests
only it can serve keep their place in the queue, within their queue timeout, and are served once
it is back; past that wait, or for a backend never seen serving, they get a 503 at once.

With several proxy processes serving the same database the slots, the fair order and the per-user
concurrency cap are shared through Postgres instead (`proxy.cluster.slots`, set as `shared`):
a request then waits there, for a backend among those this process finds serving its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from yarl import URL

from proxy.errors import QueueTimeout, SlotsUnavailable, UpstreamError
from proxy.settings import Secret, Settings
from proxy.upstream.affinity import Affinity
from proxy.upstream.fairqueue import FairQueue
from proxy.upstream.probes import Health, ModelLimits, Prober

log = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 2.0
AFFINITY_SLACK = 2  # requests per slot: "much busier" (see the module docstring)
AFFINITY_MEMORY = 100_000  # conversations whose last backend is remembered (16-byte digests)
_SERVICE_SMOOTHING = 0.2  # weight of the newest request in the mean time a slot is held
BUSY = (
    "The proxy could not get a turn at the model server: its database answered too slowly. "
    "Try again shortly."
)


class Waits(Protocol):
    """Where a request's wait for its turn, and the backend it got, are noted (its outcome)."""

    queue_ms: float | None
    backend: str | None


@dataclass(frozen=True)
class GroupCap:
    """A group's cap on its members' requests at once (`proxy.limits.budgets`)."""

    group_id: int
    cap: int
    name: str


class SharedTurns(Protocol):
    """Slots shared with other proxy processes (`proxy.cluster.slots.SharedSlots`)."""

    active: bool

    async def turn(
        self,
        user_id: int,
        backends: list[str],
        prefer: str | None,
        cap: int | None,
        budget: float,
        affinity: Affinity | None = None,
        group_caps: Sequence[GroupCap] = (),
    ) -> tuple[str, int]: ...

    def release(self, request_id: int) -> None: ...

    def database_up(self) -> bool: ...


@dataclass(frozen=True)
class Upstream:
    name: str
    host: str
    port: int
    api_key: Secret  # the internal backend key: only the proxy can use the backend
    scheme: str = "http"

    @classmethod
    def from_url(cls, url: str, api_key: Secret) -> Upstream:
        """A backend at `http[s]://host[:port]`, named by its host and port."""
        parts = urlsplit(url)
        assert parts.hostname is not None  # settings accept only URLs with a host
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.netloc, parts.hostname, port, api_key, parts.scheme)

    def url(self, path: str, raw_query: str) -> URL:
        """The backend's URL for a decoded `path` (quoted here) and the client's raw query."""
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=URL.build(path=path).raw_path,
            query_string=raw_query,
            encoded=True,
        )


@dataclass(eq=False)
class _Backend:
    upstream: Upstream
    slots: int
    in_flight: int = 0
    lone: int = 0  # of in_flight, those granted here in memory rather than by a shared lease
    health: Health = field(default_factory=Health)  # up until a probe says otherwise
    seen_up: bool = False  # a probe (or a request) found it serving once
    down_since: float | None = None  # monotonic: when it went out, having served


@dataclass(eq=False)
class _Waiter:
    user: Hashable
    model: str | None
    avoid: frozenset[str]  # backends that refused this request's connection
    future: asyncio.Future[_Backend | None]  # None: ask again (the slots became shared)
    prefer: str | None = None  # the backend that last served its conversation


class Backends:
    """Chooses a backend for each request and hands out its slots fairly."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        slots: int = 1,
        queue_timeout: float = 300.0,
        probe_interval: float = PROBE_INTERVAL_SECONDS,
        probe_timeout: float = 5.0,
        restart_wait: float = 30.0,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one backend is needed")
        self._upstreams = tuple(upstreams)
        self._backends = {u.name: _Backend(u, slots) for u in upstreams}
        self._queue: FairQueue[_Waiter] = FairQueue()
        self._queue_timeout = queue_timeout
        self._restart_wait = restart_wait
        self._back_up = asyncio.Event()  # set (and replaced) whenever a backend comes back
        self._held_seconds = 1.0  # mean time a request holds a slot, for Retry-After
        self._served: OrderedDict[bytes, str] = OrderedDict()  # conversation -> last backend
        self.shared: SharedTurns | None = None  # set when other processes may share the slots
        # Each backend's /health, now and then: what it says is taken in by `report`.
        self.prober = Prober(
            self._upstreams, self.report, self.fail_stranded, probe_interval, probe_timeout
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Backends:
        key = settings.server_api_key
        if settings.server_urls:
            upstreams = [Upstream.from_url(url, key) for url in settings.server_urls]
        else:
            upstreams = [Upstream("default", settings.server_host, settings.server_port, key)]
        return cls(
            upstreams,
            slots=settings.backend_slots,
            queue_timeout=float(settings.queue_timeout_seconds),
            probe_timeout=float(settings.connect_timeout_seconds),
            restart_wait=float(settings.backend_restart_wait_seconds),
        )

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    # -- read-only figures, for metrics and tests -------------------------------------------

    def in_flight(self, name: str) -> int:
        """Requests holding one of backend `name`'s slots."""
        return self._backends[name].in_flight

    def queued(self, name: str | None = None) -> int:
        """Requests waiting that backend `name` could serve (all waiting ones for None).

        A request that several backends could serve counts for each of them.
        """
        if name is None:
            return len(self._queue)
        backend = self._backends[name]
        return sum(1 for w in self._queue.waiting() if self._serves(backend, w.model))

    def is_up(self, name: str) -> bool:
        return self._backends[name].health.up

    def health(self, name: str) -> Health:
        """What the last probe (or a refused connection) said of backend `name`."""
        return self._backends[name].health

    def slots(self, name: str) -> int:
        return self._backends[name].slots

    def slot_counts(self) -> dict[str, int]:
        """Each backend's slots, by name."""
        return {name: b.slots for name, b in self._backends.items()}

    def lone_in_flight(self) -> dict[str, int]:
        """Requests running on each backend by a turn given in memory, not by a shared lease."""
        return {name: b.lone for name, b in self._backends.items()}

    def requeue(self) -> None:
        """Send the requests waiting in memory to take their turn again (slots became shared)."""
        for waiter in list(self._queue.waiting()):
            if not waiter.future.done():
                self._queue.remove(waiter.user, waiter)
                waiter.future.set_result(None)

    def waiting_by_user(self) -> dict[Hashable, int]:
        """Requests waiting for a turn, by user (the fair queue, for the dashboard)."""
        counts: dict[Hashable, int] = {}
        for waiter in self._queue.waiting():
            counts[waiter.user] = counts.get(waiter.user, 0) + 1
        return counts

    def models(self) -> list[str] | None:
        """The models the backends serve, as their probes last said; None when one of them does
        not say (a plain llama_cpp.server), so only asking it would tell."""
        names: set[str] = set()
        for backend in self._backends.values():
            if backend.health.models is None:
                return None
            names |= backend.health.models
        return sorted(names)

    def default_model(self) -> str | None:
        """The model a request naming none gets (see `_serves`), when the backends say."""
        return self._default_model()

    def limits(self, model: str | None) -> ModelLimits | None:
        """What bounds the prompts of `model` (None: the default), as its backends say."""
        name = model if model is not None else self._default_model()
        for backend in self._backends.values():
            if name is not None and name in backend.health.limits:
                return backend.health.limits[name]
        return None

    def largest_text(self) -> int | None:
        """The most bytes of text any model here could read (context times longest token);
        None when a backend does not say."""
        known = [limits for b in self._backends.values() for limits in b.health.limits.values()]
        if not known or any(b.health.models is None for b in self._backends.values()):
            return None
        return max(limits.n_ctx * limits.max_token_bytes for limits in known)

    def largest_context(self) -> tuple[int, int]:
        """The largest context (tokens) and the longest token (bytes) of the models here."""
        known = [limits for b in self._backends.values() for limits in b.health.limits.values()]
        return max(m.n_ctx for m in known), max(m.max_token_bytes for m in known)

    async def any_serving(self, model: str | None, budget: float) -> Upstream:
        """A backend that is up and serves `model`, the least busy, without taking a slot
        (to measure a prompt on); one coming back is waited for within `budget` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while True:
            serving = [b for b in self._backends.values() if self._serves(b, model)]
            if serving:
                return min(serving, key=lambda b: b.in_flight / b.slots).upstream
            remaining = deadline - loop.time()
            if remaining <= 0 or not any(self._awaits(b, model) for b in self._backends.values()):
                raise self._unavailable(model)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._back_up.wait()

    # -- a turn at a backend -------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        user: Hashable,
        model: str | None,
        outcome: Waits,
        avoid: Collection[str] = (),
        affinity: Affinity | None = None,
        cap: int | None = None,
        team: Hashable | None = None,
        group_caps: Sequence[GroupCap] = (),
    ) -> AsyncIterator[Upstream]:
        """Hold a slot of a backend for one request, after a fair wait for one.

        `user` is whose turn it is, `model` what the request asks for; the wait and the backend
        chosen go to `outcome`. `avoid` names backends that already refused this request (they
        are out until a probe finds them back): it keeps its place at the front of the user's
        queue. `affinity` names the conversation it continues, if any. The per-user concurrency
        cap is admission's (`proxy.limits.places`): a request reaching here already holds its
        place; `cap` is counted again across processes when the slots are shared. `team` is the
        user's group: turns go round groups first, then their users (None: on their own);
        `group_caps` its groups' caps on their members' requests at once, counted across
        processes when the slots are shared (in each process, admission counts them).
        """
        self._queue.hold(user, team)
        started = time.monotonic()
        prefer = self._last_served(affinity)
        lease: int | None = None
        try:
            backend: _Backend | None = None
            while backend is None:
                if self.shared is not None and self.shared.active and isinstance(user, int):
                    try:
                        backend, lease = await self._shared_turn(
                            user, model, outcome, frozenset(avoid), prefer, cap, affinity,
                            time.monotonic() - started, group_caps,
                        )  # fmt: skip
                        continue
                    except SlotsUnavailable as exc:
                        if self.shared.database_up():
                            # Slow or refusing, not away: a turn here in memory could run
                            # beside one another process was given.
                            raise UpstreamError(503, BUSY) from None
                        log.warning("Postgres is away (%s): this turn is given in memory", exc)
                backend = await self._turn(user, model, outcome, frozenset(avoid), prefer)
        except BaseException:
            self._queue.release(user)
            raise
        finally:
            outcome.queue_ms = (outcome.queue_ms or 0.0) + (time.monotonic() - started) * 1000.0
        outcome.backend = backend.upstream.name
        if affinity is not None:
            self._remember(affinity.key, backend.upstream.name)
        granted = time.monotonic()
        try:
            yield backend.upstream
        finally:
            held = time.monotonic() - granted
            self._held_seconds += _SERVICE_SMOOTHING * (held - self._held_seconds)
            self._queue.release(user)
            if lease is None:
                backend.lone -= 1
                self._give_back(backend)
            else:
                backend.in_flight -= 1
                assert self.shared is not None
                self.shared.release(lease)
                self._dispatch(backend)  # one waiting here in memory (Postgres away) may go

    async def _shared_turn(
        self,
        user: int,
        model: str | None,
        outcome: Waits,
        avoid: frozenset[str],
        prefer: str | None,
        cap: int | None,
        affinity: Affinity | None,
        spent: float,
        group_caps: Sequence[GroupCap] = (),
    ) -> tuple[_Backend, int]:
        """A lease on a slot shared with other processes, for a backend this process finds
        serving `model` (one coming back is waited for, within the queue timeout, of which
        `spent` seconds went already)."""
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        waited = (outcome.queue_ms or 0.0) / 1000.0 + spent
        budget = max(0.0, self._queue_timeout - waited)
        deadline = loop.time() + budget
        while True:
            names = [
                name
                for name, b in self._backends.items()
                if name not in avoid and self._serves(b, model)
            ]
            if names:
                break
            remaining = deadline - loop.time()
            hopeful = any(self._awaits(b, model) for b in self._backends.values())
            if remaining <= 0 or not hopeful:
                raise self._unavailable(model)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._back_up.wait()
        try:
            name, lease = await self.shared.turn(
                user, names, prefer, cap, max(0.0, deadline - loop.time()), affinity, group_caps
            )
        except TimeoutError:
            raise QueueTimeout(self._queue_timeout, self._retry_after()) from None
        backend = self._backends[name]
        backend.in_flight += 1
        return backend, lease

    async def _turn(
        self,
        user: Hashable,
        model: str | None,
        outcome: Waits,
        avoid: frozenset[str],
        prefer: str | None = None,
    ) -> _Backend | None:
        """A slot given here in memory; None when the slots became shared meanwhile (ask
        again)."""
        waiter = _Waiter(user, model, avoid, asyncio.get_running_loop().create_future(), prefer)
        free = [
            b
            for b in self._backends.values()
            if b.in_flight < b.slots and self._eligible(b, waiter)
        ]
        if free:
            # Nobody waits for a free slot it may take (every release hands it on), so no one
            # is passed over.
            warm = [b for b in free if b.upstream.name == prefer]
            backend = warm[0] if warm else min(free, key=lambda b: b.in_flight / b.slots)
            backend.in_flight += 1
            backend.lone += 1
            self._queue.served(user)
            return backend
        if not any(self._hopeful(b, model) for b in self._backends.values()):
            raise self._unavailable(model)
        self._queue.push(user, waiter, front=bool(avoid))
        if prefer is not None:
            # One more request waiting for its backend may make that one "much busier" for
            # somebody already waiting for it while a slot elsewhere is free.
            self._dispatch_all()
        budget = max(0.0, self._queue_timeout - (outcome.queue_ms or 0.0) / 1000.0)
        try:
            async with asyncio.timeout(budget):
                return await waiter.future
        except BaseException as exc:
            granted = waiter.future
            given = (
                granted.result()
                if granted.done() and not granted.cancelled() and granted.exception() is None
                else None
            )
            if given is not None:
                given.lone -= 1
                self._give_back(given)  # the turn came as the client left
            else:
                self._queue.remove(user, waiter)  # at once: a departed client holds no place
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(self._queue_timeout, self._retry_after()) from None
            raise

    def _give_back(self, backend: _Backend) -> None:
        backend.in_flight -= 1
        self._dispatch(backend)

    def _dispatch(self, backend: _Backend) -> None:
        """Hand `backend`'s free slots to the next eligible waiters, fairly."""
        while backend.in_flight < backend.slots and backend.health.up:
            waiter = self._queue.pop(lambda w: not w.future.done() and self._eligible(backend, w))
            if waiter is None:
                return
            backend.in_flight += 1
            backend.lone += 1
            waiter.future.set_result(backend)

    def _dispatch_all(self) -> None:
        for backend in self._backends.values():
            self._dispatch(backend)

    # -- conversations and the backend that last served them ---------------------------------

    def _last_served(self, affinity: Affinity | None) -> str | None:
        if affinity is None:
            return None
        for prefix in affinity.prefixes:
            name = self._served.get(prefix)
            if name is not None:
                return name
        return None

    def _remember(self, conversation: bytes, name: str) -> None:
        self._served[conversation] = name
        self._served.move_to_end(conversation)
        if len(self._served) > AFFINITY_MEMORY:
            self._served.popitem(last=False)

    def _eligible(self, backend: _Backend, waiter: _Waiter) -> bool:
        """Whether `waiter` may take a slot of `backend` (see the module docstring)."""
        if not self._serves(backend, waiter.model):
            return False
        prefer = self._backends.get(waiter.prefer) if waiter.prefer is not None else None
        if prefer is None or prefer is backend:
            return True
        if not self._serves(prefer, waiter.model):
            return True  # its backend is out, or does not serve this model
        return self._load(prefer, waiter) - self._load(backend, waiter) >= AFFINITY_SLACK

    def _load(self, backend: _Backend, besides: _Waiter) -> float:
        """Requests per slot running on `backend` or waiting for it, but `besides`."""
        name = backend.upstream.name
        waiting = sum(
            1
            for w in self._queue.waiting()
            if w is not besides and w.prefer == name and not w.future.done()
        )
        return (backend.in_flight + waiting) / backend.slots

    def _retry_after(self) -> int:
        slots = sum(b.slots for b in self._backends.values() if b.health.up) or 1
        estimate = math.ceil(self._held_seconds * (len(self._queue) + 1) / slots)
        return max(1, min(estimate, math.ceil(self._queue_timeout)))

    # -- which backend serves what -------------------------------------------------------------

    def _serves(self, backend: _Backend, model: str | None) -> bool:
        """Whether `backend` is up and serves `model`."""
        return backend.health.up and self._offers(backend, model)

    def _awaits(self, backend: _Backend, model: str | None) -> bool:
        """Whether `backend` is out but may come back soon, and would serve `model`."""
        since = backend.down_since
        return (
            not backend.health.up
            and since is not None
            and time.monotonic() - since < self._restart_wait
            and self._offers(backend, model)
        )

    def _hopeful(self, backend: _Backend, model: str | None) -> bool:
        return self._serves(backend, model) or self._awaits(backend, model)

    def _offers(self, backend: _Backend, model: str | None) -> bool:
        """Whether `backend` serves `model`, as far as its probes said (up or not)."""
        health = backend.health
        if health.models is None:
            return True  # it did not say what it serves: it gets anything
        if model is None:
            # A request naming no model gets the first backend's default wherever it goes, so
            # the answer does not depend on which backend was free.
            default = self._default_model()
            return default is None or health.default == default
        if model in health.models:
            return True
        # Nobody lists it: any backend may answer, with its own 404 for a model it lacks.
        return not any(
            b.health.models is not None and model in b.health.models
            for b in self._backends.values()
        )

    def _default_model(self) -> str | None:
        """The default model of the first backend (in configured order) that has named one."""
        return next((b.health.default for b in self._backends.values() if b.health.default), None)

    def _unavailable(self, model: str | None) -> UpstreamError:
        serving = f" serving {model!r}" if model and len(self._backends) > 1 else ""
        return UpstreamError(
            503,
            f"The model server is not reachable: no backend{serving} is up right now. "
            "Try again shortly.",
        )

    # -- health ---------------------------------------------------------------------------------

    def report(self, name: str, health: Health) -> None:
        """Take in what a probe (or a refused connection) says about backend `name`."""
        backend = self._backends[name]
        before = backend.health
        if not health.up:  # keep what it serves, for routing its models elsewhere meanwhile
            health = Health(health.problem, before.models, before.default, before.limits)
        backend.health = health
        if before.up and not health.up:
            log.warning("backend %s is out: %s", name, health.problem)
            if backend.seen_up:  # one that never served is not waited for
                backend.down_since = time.monotonic()
            self.fail_stranded()
            self._dispatch_all()  # those waiting for it in particular may go elsewhere now
        elif health.up and not before.up:
            log.warning("backend %s is back in", name)
            backend.down_since = None
            self._back_up.set()
            self._back_up = asyncio.Event()
        if health.up:
            backend.seen_up = True
            self._dispatch(backend)

    def refused(self, upstream: Upstream, reason: str) -> None:
        """A request could not connect to `upstream`: out until a probe finds it up again."""
        self.report(upstream.name, Health(f"refused a request ({reason})"))

    def fail_stranded(self) -> None:
        """Answer at once the waiters that no backend up, or coming back, can serve."""
        backends = self._backends.values()
        for waiter in list(self._queue.waiting()):
            if not waiter.future.done() and not any(
                self._hopeful(b, waiter.model) for b in backends
            ):
                self._queue.remove(waiter.user, waiter)
                waiter.future.set_exception(self._unavailable(waiter.model))
