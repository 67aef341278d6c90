"""How fairly llama-gate shares one single-slot backend: 4 users who all want more than their share.

    runtime/.venv/bin/python bench/fairness.py [--seconds 20] [--service-ms 100]

A fake model server serves one request at a time, each in a fixed service time, in arrival
order (an asyncio.Lock, as llama_cpp.server's model lock). Four users send requests at different
rates (Poisson arrivals, fixed seed), together several times what it can serve, through the real
proxy (real keys, rate limits, audit rows in Postgres: a throwaway one unless BENCH_DATABASE_URL
names one). Each run prints every user's served requests, share of service and median wait, and
Jain's fairness index over the served counts (1 = equal shares; the target is >= 0.95, since
every user here wants more than a quarter). Three runs:

- fair: llama-gate as configured by default (LLAMA_BACKEND_SLOTS=1, LLAMA_PROXY_MAX_CONCURRENT=4);
- fair, no cap: the same queue with the per-user cap lifted, to show the queue alone is fair;
- plain FIFO: no queue in the proxy (slots and cap 1000), so requests wait for the backend's own
  lock in arrival order, which is what sharing llama_cpp.server without llama-gate gives.

Requests still open when a run ends are dropped (the client disconnects) and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.auth.apikeys import KeyHasher, generate_key  # noqa: E402
from proxy.db import migrate, queries  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402
from proxy.settings import load_settings  # noqa: E402

BACKEND_KEY = "bench-backend-key"
RATES = {"u1": 4.0, "u2": 6.0, "u3": 10.0, "u4": 20.0}  # requests per second offered
ANSWER = {
    "id": "cmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
MODES = {  # name -> (LLAMA_BACKEND_SLOTS, LLAMA_PROXY_MAX_CONCURRENT)
    "fair": ("1", "4"),
    "fair, no cap": ("1", "1000"),
    "plain FIFO": ("1000", "1000"),
}


@dataclass
class UserResult:
    offered: float
    served: int = 0
    refused: int = 0  # 429: the user's concurrency cap
    waits: list[float] = field(default_factory=list)  # seconds from sending to the answer


def jain(values: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all are equal."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


@asynccontextmanager
async def single_slot_backend(service_seconds: float) -> AsyncIterator[str]:
    lock = asyncio.Lock()  # FIFO: waiters get it in the order they asked

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        async with lock:
            await asyncio.sleep(service_seconds)
        return web.json_response(ANSWER)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": ["bench"], "default": "bench"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxy(dsn: str, backend: str, slots: str, cap: str) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory() as home:
        environ = {
            "POSTGRES_AUTH_DSN": dsn, "LLAMA_SERVER_URLS": backend,
            "LLAMA_SERVER_API_KEY": BACKEND_KEY, "LLAMA_PROXY_METRICS_PORT": "0",
            "LLAMA_PROXY_DASHBOARD_PORT": "0",
            "LLAMA_BACKEND_SLOTS": slots, "LLAMA_PROXY_MAX_CONCURRENT": cap,
        }  # fmt: skip
        app = create_app(load_settings(environ=environ, home=Path(home)))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}/v1/chat/completions"
        finally:
            await runner.cleanup()


async def user_load(
    client: aiohttp.ClientSession, url: str, key: str, result: UserResult, seed: int,
    until: float,
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    arrivals = random.Random(seed)  # noqa: S311 - arrival times, repeatable, not secrets
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        sent = time.monotonic()
        async with client.post(url, json=body, headers=headers) as response:
            await response.read()
            if time.monotonic() > until:
                return  # answered after the run: not counted
            if response.status == 200:
                result.served += 1
                result.waits.append(time.monotonic() - sent)
            elif response.status == 429:
                result.refused += 1
            else:
                raise RuntimeError(f"unexpected HTTP {response.status}")

    try:
        while (now := time.monotonic()) < until:
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(min(arrivals.expovariate(result.offered), until - now))
        await asyncio.sleep(0.05)  # let answers already on their way arrive
    finally:
        for task in tasks:
            task.cancel()  # the client gives up: the proxy drops the request
        await asyncio.gather(*tasks, return_exceptions=True)


async def run(dsn: str, keys: dict[str, str], mode: str, seconds: float,
              service: float) -> dict[str, UserResult]:  # fmt: skip
    slots, cap = MODES[mode]
    results = {user: UserResult(rate) for user, rate in RATES.items()}
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        single_slot_backend(service) as backend,
        proxy(dsn, backend, slots, cap) as url,
        aiohttp.ClientSession(connector=connector) as client,
    ):
        for key in keys.values():  # each key is verified once, outside the measurement
            async with client.post(url, json={"max_tokens": 1}, headers={
                "Authorization": f"Bearer {key}"
            }) as response:  # fmt: skip
                await response.read()
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(
                user_load(client, url, keys[user], results[user], seed, until)
                for seed, user in enumerate(RATES)
            )
        )
    return results


async def make_users(dsn: str) -> dict[str, str]:
    con = await asyncpg.connect(dsn)
    keys = {}
    try:
        await con.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        for user in RATES:
            row = await queries.create_user(con, user, 1_000_000, 60)  # no rate limit here
            key = generate_key()
            secret_hash = KeyHasher().hash(key.secret)
            await queries.insert_key(con, row["id"], key.key_id, secret_hash, None, None)
            keys[user] = key.full.reveal()
    finally:
        await con.close()
    return keys


def report(results: dict[str, dict[str, UserResult]], seconds: float, service: float) -> None:
    capacity = 1 / service
    offered = sum(RATES.values())
    print(
        f"One single-slot backend, {service * 1000:.0f} ms per request ({capacity:.0f} req/s); "
        f"4 users offering {offered:.0f} req/s in all, {seconds:.0f} s per run.\n"
    )
    head = ("run", "user", "offered/s", "served", "share", "429s", "p50 wait s")
    print("{:<14} {:<5} {:>9} {:>7} {:>7} {:>6} {:>11}".format(*head))
    for mode, users in results.items():
        total = sum(r.served for r in users.values()) or 1
        for user, r in users.items():
            wait = f"{statistics.median(r.waits):.2f}" if r.waits else "-"
            print(
                f"{mode:<14} {user:<5} {r.offered:>9.1f} {r.served:>7} "
                f"{r.served / total:>7.1%} {r.refused:>6} {wait:>11}"
            )
    print()
    print(f"{'run':<14} {'Jain index':>10} {'target':>10}  met")
    for mode, users in results.items():
        index = jain([float(r.served) for r in users.values()])
        target = ">= 0.95" if mode.startswith("fair") else "(baseline)"
        met = ("yes" if index >= 0.95 else "NO") if mode.startswith("fair") else "-"
        print(f"{mode:<14} {index:>10.3f} {target:>10}  {met}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--service-ms", type=float, default=100.0, help="time per request")
    args = parser.parse_args()
    service = args.service_ms / 1000
    with database() as dsn:
        migrate.upgrade(dsn)
        keys = asyncio.run(make_users(dsn))
        results = {mode: asyncio.run(run(dsn, keys, mode, args.seconds, service)) for mode in MODES}
    report(results, args.seconds, service)


if __name__ == "__main__":
    main()
