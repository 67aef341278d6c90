"""What the benchmarks share: their processes, loads, figures and users.

`process` runs a server from a checkout with its output in a file and `wait_http` waits for it to
answer; `load` sends JSON or streamed chats at a concurrency for some seconds and gives a `Result`
(latencies, TTFB, the spacing error of streamed events); `cpu_seconds`, `ticks` and `idle_since`
read what a process and the machine spent; `bench_users` makes the benchmark's users and keys,
`copy_database` gives a proxy a database of its own, `audit_rows` counts what the audit writer
wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from proxy.auth.apikeys import KeyHasher, generate_key
from proxy.db import accounts

ROOT = Path(__file__).resolve().parent.parent
BACKEND_KEY = "bench-backend-key"  # what the fake backend (bench/upstream.py) is started with
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
QUICK = {**CHAT, "stream": True}  # answered at once, in one quick event

# A stream's first byte, measured over many streams one at a time (a p50 of the five streams
# the sse c=1 load has says little), each begun a moment after the last, as chats start.
FIRST_EVENT_PAUSE_SECONDS = 0.010
STREAM = {**CHAT, "messages": [{"role": "user", "content": "stream slowly"}], "stream": True}


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds
    ttfb: list[float] = field(default_factory=list)
    spacing_error: list[float] = field(default_factory=list)  # |client gap - sender gap|, s
    elapsed: float = 0.0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # what the errors were

    @property
    def count(self) -> int:
        return len(self.latencies)

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0

    @property
    def rps(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0


async def _plain(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    async with client.post(url, json=CHAT, headers=headers) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start


async def _stream(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], result: Result
) -> float:
    start = time.perf_counter()
    previous: tuple[int, int] | None = None  # (sent ns, received ns)
    async with client.post(url, json=STREAM, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            received = time.monotonic_ns()
            event = json.loads(line[6:])
            if "t" not in event:
                continue
            if previous is None:
                result.ttfb.append(time.perf_counter() - start)
            else:
                gap_client = received - previous[1]
                gap_sender = event["t"] - previous[0]
                result.spacing_error.append(abs(gap_client - gap_sender) / 1e9)
            previous = (event["t"], received)
    return time.perf_counter() - start


async def _first_event(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], result: Result
) -> float:
    """A quick stream, its time to its first event kept; it is read to its end."""
    start = time.perf_counter()
    async with client.post(url, json=QUICK, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for line in response.content:
            if line.startswith(b"data: {"):
                result.ttfb.append(time.perf_counter() - start)
                break
        await response.read()
    await asyncio.sleep(FIRST_EVENT_PAUSE_SECONDS)
    return time.perf_counter() - start


async def load(
    url: str,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    streamed: bool,
    first_events: bool = False,
) -> Result:
    result = Result()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        # Warm up connections and caches (the proxy's first use of a key verifies it).
        for _ in range(concurrency):
            await _plain(client, url, headers)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    if first_events:
                        result.latencies.append(await _first_event(client, url, headers, result))
                    elif streamed:
                        result.latencies.append(await _stream(client, url, headers, result))
                    else:
                        result.latencies.append(await _plain(client, url, headers))
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                    result.errors += 1  # a stream that stalled past the client's timeout too
                    kind = str(exc) if isinstance(exc, RuntimeError) else type(exc).__name__
                    result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


def wait_http(url: str, process: subprocess.Popen[bytes], path: str = "") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited: {_log_tail(process)}")
        try:
            urllib.request.urlopen(url + path, timeout=1).close()  # noqa: S310
            return
        except urllib.error.HTTPError:
            return  # it answers; the status does not matter
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up: {_log_tail(process)}")


def _log_tail(process: subprocess.Popen[bytes]) -> str:
    log = getattr(process, "log_path", None)
    return Path(log).read_text(errors="replace")[-4000:] if log else ""


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` running in `cwd`, its output in a file: a pipe nobody reads fills after 64 KiB of
    log lines and then stops the process at its next one (a flood of refusals logs one each)."""
    with tempfile.NamedTemporaryFile(prefix="llama-gate-bench-", suffix=".log") as log:
        proc = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc.log_path = log.name  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def add_user(con: asyncpg.Connection, name: str) -> str:
    """A new user `name` whose rate limit never binds (1,000,000 a minute); their key."""
    user = await accounts.create_user(con, name, 1_000_000, 60)
    key = generate_key()
    await accounts.insert_key(con, user["id"], key.key_id, KeyHasher().hash(key.secret), None, None)
    return key.full.reveal()


async def bench_users(dsn: str) -> tuple[str, str]:
    """A key of the benchmark's user, and one of a user who floods at the default cap (4)."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        keys = [await add_user(con, name) for name in ("bench", "flooder")]
        await accounts.set_user_limits(con, "flooder", {"max_concurrent": 4})
    finally:
        await con.close()
    return keys[0], keys[1]


async def copy_database(dsn: str, name: str) -> str:
    """A new database `name` on `dsn`'s server, a copy of `dsn`'s (nobody may be connected to
    it meanwhile); its DSN."""
    parts = urlsplit(dsn)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await con.execute(f'CREATE DATABASE "{name}" TEMPLATE "{parts.path.lstrip("/")}"')
    finally:
        await con.close()
    return parts._replace(path=f"/{name}").geturl()


async def audit_rows(dsn: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval("SELECT count(*) FROM llama_requests"))
    finally:
        await con.close()


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of a process, its threads and its live children so far (Linux:
    a `--workers` parent's workers are its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


def ticks() -> tuple[int, int]:
    """The machine's idle (with iowait) and total CPU ticks so far (Linux)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def idle_since(since: tuple[int, int]) -> float:
    """The share of the machine's CPU time left idle since `since` (a `ticks()`)."""
    now = ticks()
    return (now[0] - since[0]) / max(1, now[1] - since[1])
