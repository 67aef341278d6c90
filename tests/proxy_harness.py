"""Shared pieces of the proxy's tests: users and keys in the test database, the fake backend,
the proxy itself (in-process under aiohttp's TestServer, or as a real `python -m proxy`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.appkeys import AUTH_LISTENER, COMPLETION_HOOKS, STRANGERS
from proxy.audit.row import AuditRow
from proxy.auth.apikeys import KeyHasher, generate_key
from proxy.db import accounts
from proxy.db.localpg import free_port
from proxy.settings import Settings, load_settings
from tests.fake_upstream import FakeUpstream

BACKEND_KEY = "backend-internal-key"
ROOT = Path(__file__).resolve().parent.parent


async def make_user(
    dsn: str,
    username: str,
    rate_limit: int | None = None,
    rate_window_seconds: int | None = None,
    expires_at: datetime | None = None,
    hasher: KeyHasher | None = None,
) -> tuple[int, str]:
    """Create a user with one key; return (user id, full key)."""
    con = await asyncpg.connect(dsn)
    try:
        user = await accounts.create_user(con, username, rate_limit, rate_window_seconds)
        key = await add_key(con, user["id"], expires_at, hasher)
    finally:
        await con.close()
    return user["id"], key


async def add_key(
    con: asyncpg.Connection,
    user_id: int,
    expires_at: datetime | None = None,
    hasher: KeyHasher | None = None,
) -> str:
    key = generate_key()
    secret_hash = (hasher or KeyHasher()).hash(key.secret)
    await accounts.insert_key(con, user_id, key.key_id, secret_hash, None, expires_at)
    return key.full.reveal()


def random_key() -> str:
    """Shaped like a key, known to no database."""
    return generate_key().full.reveal()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def proxy_environ(dsn: str, upstream_port: int, home: Path, **extra: str) -> dict[str, str]:
    return {
        "POSTGRES_AUTH_DSN": dsn,
        "LLAMA_GATE_HOME": str(home),
        "LLAMA_SERVER_HOST": "127.0.0.1",
        "LLAMA_SERVER_PORT": str(upstream_port),
        "LLAMA_SERVER_API_KEY": BACKEND_KEY,
        "LLAMA_PROXY_METRICS_PORT": "0",  # tests that read metrics give a free port
        "LLAMA_PROXY_DASHBOARD_PORT": "0",  # and so do those that open the dashboard
        **extra,
    }


def proxy_settings(dsn: str, upstream_port: int, home: Path, **extra: str) -> Settings:
    environ = proxy_environ(dsn, upstream_port, home, **extra)
    return load_settings(environ=environ, home=home)


@dataclass
class Harness:
    """A running proxy in front of a running fake backend, on one test database."""

    dsn: str
    upstream: FakeUpstream
    server: TestServer
    records: list[AuditRow] = field(default_factory=list)  # each finished request's row

    @property
    def app(self) -> web.Application:
        return self.server.app

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    _recorded: asyncio.Event = field(default_factory=asyncio.Event)

    def collect(self, row: AuditRow) -> None:
        """The completion hook the tests register."""
        self.records.append(row)
        self._recorded.set()

    async def wait_for_records(self, count: int) -> list[AuditRow]:
        """The records once `count` requests have ended (hooks run as a response finishes)."""
        while len(self.records) < count:
            self._recorded.clear()
            await asyncio.wait_for(self._recorded.wait(), 5)
        return self.records

    async def user(self, username: str, **kwargs: int | None) -> str:
        """A new user's key."""
        return (await make_user(self.dsn, username, **kwargs))[1]  # type: ignore[arg-type]

    async def strangers(self) -> list[asyncpg.Record]:
        """`llama_unauthenticated`, once the requests without a valid key so far are in it."""
        await self.app[STRANGERS].flush()
        con = await asyncpg.connect(self.dsn)
        try:
            return await con.fetch(
                "SELECT * FROM llama_unauthenticated ORDER BY minute, client_addr"
            )
        finally:
            await con.close()


@asynccontextmanager
async def running_proxy(
    dsn: str,
    home: Path,
    upstream: FakeUpstream | None = None,
    listening: bool = True,
    **settings: str,
) -> AsyncIterator[Harness]:
    """The proxy under aiohttp's TestServer (which cancels handlers of departed clients).

    With `listening`, it waits until the revocation listener is connected, so no test's first
    request races the listener's start (which marks cached keys for re-checking).
    """
    upstream = upstream or FakeUpstream(expected_key=BACKEND_KEY)
    await upstream.start()
    app = create_app(proxy_settings(dsn, upstream.port, home, **settings))
    harness = Harness(dsn, upstream, TestServer(app))
    app[COMPLETION_HOOKS].append(harness.collect)
    try:
        await harness.server.start_server()
        if listening:
            await asyncio.wait_for(app[AUTH_LISTENER].connected.wait(), 10)
        yield harness
    finally:
        await harness.server.close()
        await upstream.stop()


@contextmanager
def proxy_process(
    environ: dict[str, str], port: int | None = None, log: Path | None = None
) -> Iterator[str]:
    """`python -m proxy` as a real process; yields its base URL once /health answers.

    Its output goes to `log` (a temporary file when not given): a pipe nobody reads would
    block a chatty process.
    """
    port = port or free_port()
    env = {**os.environ, **environ}
    with contextlib.ExitStack() as stack:
        output = (
            stack.enter_context(log.open("wb"))
            if log is not None
            else stack.enter_context(tempfile.TemporaryFile())
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, process, output)
            yield url
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


def wait_for_health(
    url: str, process: subprocess.Popen[bytes], output: IO[bytes] | None = None, timeout: float = 30
) -> None:
    """Block until the process answers /health (sync, so async tests may call it too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = b""
            if output is not None:
                output.seek(0)
                said = output.read()
            elif process.stdout is not None:
                said = process.stdout.read()
            raise AssertionError(f"proxy exited with {process.returncode}: {said.decode()}")
        if _healthy(url):
            return
        time.sleep(0.1)
    raise AssertionError(f"proxy at {url} did not become healthy within {timeout} s")


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds (for state that has no event to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling is the point: nothing to await
            await asyncio.sleep(0.005)
