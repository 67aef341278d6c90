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

Then one run with groups (`fair, 2 groups`): u1, u2 and u3 are one group, u4 another, each
group offering twice what the backend serves; turns go round the groups first, so each group
should get half (target: Jain's index across the two groups >= 0.95; by users it is not 1).

Then two runs with two proxy processes (`python -m proxy`, sharing the backend's slot through
Postgres) in front of the same backend, which counts the most requests it ever held at once:

- 2 processes: u1 and u2 through one process, u3 and u4 through the other (target: Jain >= 0.95);
- 2 processes, flood: one user floods through one process at 20 req/s (cap 4), another sends one
  request at a time through the other: how long each of the latter waits beyond its own service
  (target: at most one service time, the request already running).

Requests still open when a run ends are dropped (the client disconnects) and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from harness import BACKEND_KEY, add_user  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.db import migrate  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402
from proxy.settings import load_settings  # noqa: E402

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
    sent: list[float] = field(default_factory=list)  # when each request answered was sent
    served: int = 0
    refused: int = 0  # 429: the user's concurrency cap
    waits: list[float] = field(default_factory=list)  # seconds from sending to the answer


def jain(values: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all are equal."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


@dataclass
class Held:
    now: int = 0
    most: int = 0  # the most requests the backend held at once
    ended: float | None = None  # when the last request ended, while nothing else ran
    starts: list[tuple[float, str]] = field(default_factory=list)  # when each began, and its text
    idle: list[float] = field(default_factory=list)  # from one request's end to the next's start


@asynccontextmanager
async def single_slot_backend(
    service_seconds: float, held: Held | None = None
) -> AsyncIterator[str]:
    lock = asyncio.Lock()  # FIFO: waiters get it in the order they asked
    held = held or Held()

    async def chat(request: web.Request) -> web.Response:
        text = (await request.json())["messages"][0]["content"]
        held.starts.append((time.monotonic(), text))
        if held.now == 0 and held.ended is not None:
            held.idle.append(time.monotonic() - held.ended)
        held.now += 1
        held.most = max(held.most, held.now)
        try:
            async with lock:
                await asyncio.sleep(service_seconds)
        finally:
            held.now -= 1
            held.ended = time.monotonic() if held.now == 0 else None
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
    body = {"messages": [{"role": "user", "content": f"Hi from {seed}"}], "max_tokens": 1}
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


@asynccontextmanager
async def proxy_process(dsn: str, backend: str, log: Path) -> AsyncIterator[str]:
    """`python -m proxy` as a process of its own, one of several sharing the backend's slot."""
    port = free_port()
    environ = {
        **os.environ, "POSTGRES_AUTH_DSN": dsn, "LLAMA_SERVER_URLS": backend,
        "LLAMA_SERVER_API_KEY": BACKEND_KEY, "LLAMA_PROXY_METRICS_PORT": "0",
        "LLAMA_PROXY_DASHBOARD_PORT": "0", "LLAMA_GATE_HOME": str(log.parent),
    }  # fmt: skip
    with log.open("wb") as output:  # a file: a pipe nobody reads would block its log
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port),
            cwd=ROOT, env=environ, stdout=output, stderr=output,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(300):
                if process.returncode is not None:
                    raise RuntimeError(f"the proxy exited; see {log}")
                try:
                    async with client.get(f"{base}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield f"{base}/v1/chat/completions"
    finally:
        process.terminate()
        await process.wait()


async def run_two(dsn: str, keys: dict[str, str], seconds: float, service: float, flood: bool,
                  held: Held) -> dict[str, UserResult]:  # fmt: skip
    """u1, u2 through one process and u3, u4 through the other; or, with `flood`, u4 flooding
    through one and u1 one request at a time through the other."""
    rates = {"u4": 20.0, "u1": 0.0} if flood else RATES
    results = {user: UserResult(rate) for user, rate in rates.items()}
    connector = aiohttp.TCPConnector(limit=0)
    with tempfile.TemporaryDirectory() as home:
        async with (
            single_slot_backend(service, held) as backend,
            proxy_process(dsn, backend, Path(home) / "first.log") as first,
            proxy_process(dsn, backend, Path(home) / "second.log") as second,
            aiohttp.ClientSession(connector=connector) as client,
        ):
            via = {"u1": first, "u2": first, "u3": second, "u4": second}
            for user in results:  # each key verified once, outside the measurement
                async with client.post(via[user], json={"max_tokens": 1}, headers={
                    "Authorization": f"Bearer {keys[user]}"
                }) as response:  # fmt: skip
                    await response.read()
            await asyncio.sleep(3)  # both processes have found each other: slots are shared
            until = time.monotonic() + seconds
            if flood:
                # First alone: what the proxies themselves add to the one-at-a-time user's wait.
                alone = results["u1 alone"] = UserResult(0.0)
                await one_at_a_time(client, via["u1"], keys["u1"], alone, until - seconds / 2)
                until = time.monotonic() + seconds
                await asyncio.gather(
                    user_load(client, via["u4"], keys["u4"], results["u4"], 3, until),
                    one_at_a_time(client, via["u1"], keys["u1"], results["u1"], until),
                )
            else:
                await asyncio.gather(
                    *(
                        user_load(client, via[user], keys[user], results[user], seed, until)
                        for seed, user in enumerate(RATES)
                    )
                )
    return results


async def one_at_a_time(client: aiohttp.ClientSession, url: str, key: str, result: UserResult,
                        until: float) -> None:  # fmt: skip
    """A user who sends a request, waits for its answer, pauses a moment, and sends another."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "one at a time"}], "max_tokens": 1}
    pauses = random.Random(7)  # noqa: S311 - think times, repeatable, not secrets
    while time.monotonic() < until:
        sent = time.monotonic()
        async with client.post(url, json=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"unexpected HTTP {response.status}")
        result.served += 1
        result.sent.append(sent)
        result.waits.append(time.monotonic() - sent)
        await asyncio.sleep(pauses.uniform(0.05, 0.3))


def report_two(
    results: dict[str, dict[str, UserResult]], service: float, held: Held, handoffs: list[float]
) -> None:
    print("\nTwo proxy processes sharing the backend's one slot through Postgres:\n")
    head = ("run", "user", "via", "offered/s", "served", "share", "p50 wait s")
    print("{:<22} {:<8} {:>6} {:>9} {:>7} {:>7} {:>11}".format(*head))
    via = {"u1": "first", "u2": "first", "u3": "second", "u4": "second", "u1 alone": "first"}
    for mode, users in results.items():
        total = sum(r.served for name, r in users.items() if name != "u1 alone") or 1
        for user, r in users.items():
            wait = f"{statistics.median(r.waits):.2f}" if r.waits else "-"
            offered = f"{r.offered:.1f}" if r.offered else "1 at once"
            share = "-" if user == "u1 alone" else f"{r.served / total:.1%}"
            print(
                f"{mode:<22} {user:<8} {via[user]:>6} {offered:>9} {r.served:>7} "
                f"{share:>7} {wait:>11}"
            )
    shares = results["2 processes"]
    index = jain([float(r.served) for r in shares.values()])
    flood = results["2 processes, flood"]
    # How many of the flood's requests the backend began between one of the other user's
    # requests being sent and its beginning: requests it waited for, besides the one running.
    mine = [at for at, text in held.starts if text == "one at a time"]
    theirs = [at for at, text in held.starts if text != "one at a time"]
    sent = flood["u1 alone"].sent + flood["u1"].sent
    ahead = max(
        sum(1 for at in theirs if was_sent < at < began)
        for was_sent, began in zip(sent, mine, strict=False)
    )
    # What the proxies add to a request with nobody else about (auth, limits, the slot's two
    # calls to Postgres): not the flood's doing, so taken off.
    own = statistics.median(w - service for w in flood["u1 alone"].waits)
    victim = sorted(w - service - own for w in flood["u1"].waits)
    p99 = victim[min(len(victim) - 1, int(len(victim) * 0.99))]
    print(
        f"\n(the one-at-a-time user alone first: the proxies add {own * 1000:.1f} ms to each of "
        "its requests; taken off below)\n"
    )
    print(f"{'figure':<58} {'measured':>10} {'target':>12}  met")
    rows = [
        ("Jain index, 4 users split over 2 processes", f"{index:.3f}", ">= 0.95",
         index >= 0.95),
        ("flood requests begun ahead of one of its requests, most", str(ahead), "<= 1",
         ahead <= 1),
        ("wait the flood adds to one of its requests, p50 (ms)",
         f"{statistics.median(victim) * 1000:.1f}", "-", None),
        ("  p99 (ms)", f"{p99 * 1000:.1f}", "-", None),
        (f"  max (ms), against one service time ({service * 1000:.0f} ms) + a hand-off",
         f"{victim[-1] * 1000:.1f}", f"<= {(service + handoffs[-1]) * 1000:.0f}",
         victim[-1] <= service + handoffs[-1]),
        ("most requests the backend held at once (its slots: 1)", str(held.most), "<= 1",
         held.most <= 1),
        ("slot idle between two requests, saturated, p50 (ms)",
         f"{statistics.median(handoffs) * 1000:.1f}", "-", None),
        ("  p99 (ms)", f"{handoffs[int(len(handoffs) * 0.99)] * 1000:.1f}", "-", None),
    ]  # fmt: skip
    for name, measured, target, met in rows:
        shown = "-" if met is None else "yes" if met else "NO"
        print(f"{name:<58} {measured:>10} {target:>12}  {shown}")


async def make_users(dsn: str) -> dict[str, str]:
    con = await asyncpg.connect(dsn)
    keys = {}
    try:
        await con.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        for user in RATES:
            keys[user] = await add_user(con, user)  # no rate limit here
    finally:
        await con.close()
    return keys


GROUPS = {"big": ("u1", "u2", "u3"), "small": ("u4",)}


async def grouped(dsn: str, on: bool) -> None:
    """Put the users in GROUPS (`on`), or in no group."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("DELETE FROM llama_groups")
        if on:
            for name, users in GROUPS.items():
                await con.execute(
                    """WITH g AS (INSERT INTO llama_groups (name) VALUES ($1) RETURNING id)
                       INSERT INTO llama_group_members (group_id, user_id)
                       SELECT g.id, u.id FROM g, users u WHERE u.username = ANY($2::text[])""",
                    name,
                    list(users),
                )
    finally:
        await con.close()


def report_groups(users: dict[str, UserResult]) -> None:
    total = sum(r.served for r in users.values()) or 1
    served = {name: sum(users[u].served for u in members) for name, members in GROUPS.items()}
    print(f"{'group':<6} {'users':<9} {'served':>7} {'share':>7}")
    for name, members in GROUPS.items():
        print(f"{name:<6} {','.join(members):<9} {served[name]:>7} {served[name] / total:>7.1%}")
    index = jain([float(v) for v in served.values()])
    print(f"\n{'figure':<40} {'measured':>8} {'target':>9}  met")
    print(f"{'Jain index across the 2 groups':<40} {index:>8.3f} {'>= 0.95':>9}  "
          f"{'yes' if index >= 0.95 else 'NO'}")  # fmt: skip
    by_user = jain([float(r.served) for r in users.values()])
    print(f"{'  (across the 4 users)':<40} {by_user:>8.3f} {'-':>9}  -")


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
        fair = mode in ("fair", "fair, no cap")  # with groups, the shares go by group (below)
        target = ">= 0.95" if fair else "(baseline)" if mode == "plain FIFO" else "(by group)"
        met = ("yes" if index >= 0.95 else "NO") if fair else "-"
        print(f"{mode:<14} {index:>10.3f} {target:>10}  {met}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--service-ms", type=float, default=100.0, help="time per request")
    parser.add_argument(
        "--only-processes", action="store_true", help="only the runs with two proxy processes"
    )
    parser.add_argument("--only-groups", action="store_true", help="only the run with groups")
    args = parser.parse_args()
    service = args.service_ms / 1000
    held = Held()
    with database() as dsn:
        migrate.upgrade(dsn)
        keys = asyncio.run(make_users(dsn))
        results = (
            {}
            if args.only_processes or args.only_groups
            else {mode: asyncio.run(run(dsn, keys, mode, args.seconds, service)) for mode in MODES}
        )
        groups: dict[str, UserResult] = {}
        if not args.only_processes:
            asyncio.run(grouped(dsn, True))
            groups = asyncio.run(run(dsn, keys, "fair", args.seconds, service))
            asyncio.run(grouped(dsn, False))
        if args.only_groups:
            report({"fair, 2 groups": groups}, args.seconds, service)
            print()
            report_groups(groups)
            return
        two = {"2 processes": asyncio.run(run_two(dsn, keys, args.seconds, service, False, held))}
        handoffs = sorted(held.idle)  # saturated: every gap is a slot handed on
        two["2 processes, flood"] = asyncio.run(
            run_two(dsn, keys, args.seconds, service, True, held)
        )
    if results:
        report({**results, "fair, 2 groups": groups}, args.seconds, service)
        print()
        report_groups(groups)
        print()
    report_two(two, service, held, handoffs)


if __name__ == "__main__":
    main()
