"""What llama-gate costs: the same load straight to a backend, through a bare pass-through, and
through llama-gate (real key, rate limits on, audit rows written to Postgres), in one run; and
llama-gate once more without its audit journal (d), and once with a Postgres that does not fsync
(e: what the tests run, and how earlier runs of this benchmark were measured).

    runtime/.venv/bin/python bench/overhead.py [--seconds 5]

Starts its own fake backend, baseline and proxy processes and two throwaway Postgres servers:
one with default durability (fsync and synchronous_commit on, as every real deployment runs it)
for c and d, and one without for e (BENCH_DATABASE_URL names one to use for all instead). Then
one more load: another user's stream while a user sends 8 MiB bodies at their concurrency cap.
`--floor-only` sets llama-gate beside `bench/floor.py`, a proxy on the same stack doing only what
llama-gate's duties require (key, body, a stream asked and assembled, a journal line).
Everything runs on this machine, so the load generator shares the cores with what it measures;
compare rows, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402
from harness import (  # noqa: E402
    BACKEND_KEY,
    Result,
    audit_rows,
    bench_users,
    copy_database,
    cpu_seconds,
    idle_since,
    load,
    process,
    ticks,
    wait_http,
)

from proxy.audit.journal import Journal  # noqa: E402
from proxy.audit.row import AuditRow  # noqa: E402
from proxy.db import migrate  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402

GATE = "c: llama-gate"
NO_JOURNAL = "d: llama-gate, no journal"
NO_FSYNC = "e: llama-gate, Postgres no fsync"
WORKERS = "f: llama-gate --workers 2"
APART = "g: 2 lone proxies, load split"  # the bound: two processes that share nothing
DIRECT = "a: direct"
BARE = "b: bare pass-through"
FIRST_EVENTS = "ttfb c=1"
FLOOR = "h: floor (llama-gate's duties only)"  # bench/floor.py
# Just under the 8 MiB a body may have: one message of 8 MiB of text.
FLOOD_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "x " * ((4 << 20) - 64)}], "max_tokens": 16}
).encode()


def _flood(url: str, headers: dict[str, str], stop: Any, sent: Any) -> None:
    """Another process (so that sending them stalls only the proxy, not the measuring client):
    4 bodies of 8 MiB in flight at all times until `stop` is set; `sent` counts them."""

    async def flooder() -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            while not stop.is_set():
                try:
                    async with client.post(url, data=FLOOD_BODY, headers=headers) as response:
                        await response.read()
                except (aiohttp.ClientError, TimeoutError):
                    pass
                with sent.get_lock():
                    sent.value += 1

    async def flood() -> None:
        await asyncio.gather(*(flooder() for _ in range(4)))

    asyncio.run(flood())


def flood_load(
    url: str, headers: dict[str, str], flood_headers: dict[str, str], seconds: float
) -> tuple[Result, int]:
    """A stream (sse c=1) while another user keeps 4 requests of 8 MiB in flight: the stream's
    result, and how many of the large bodies were sent."""
    stop, sent = multiprocessing.Event(), multiprocessing.Value("i", 0)
    flooder = multiprocessing.Process(target=_flood, args=(url, flood_headers, stop, sent))
    flooder.start()
    try:
        time.sleep(1.0)  # the flood is on
        result = asyncio.run(load(url, headers, 1, seconds, True))
    finally:
        stop.set()
        flooder.join(150)
    return result, int(sent.value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load (>= 5)")
    parser.add_argument(
        "--journal-rounds", type=int, default=7, help="alternating runs of c and d (journal cost)"
    )
    parser.add_argument(
        "--journal-only", action="store_true", help="only the journal's cost: c and d, json c=32"
    )
    parser.add_argument(
        "--flood-only", action="store_true", help="only the 8 MiB flood's line (and sse c=1 alone)"
    )
    parser.add_argument(
        "--floor-only",
        action="store_true",
        help="only JSON loads through a, b, h (bench/floor.py: a proxy doing llama-gate's duties "
        "and nothing more) and c: what llama-gate's pipeline costs beyond its duties",
    )
    parser.add_argument(
        "--workers-only",
        action="store_true",
        help="only JSON loads through a, b, c and f (`serve --workers 2`): what a worker adds",
    )
    args = parser.parse_args()
    python = sys.executable
    up_port, base_port, gate_port, unjournaled_port, loose_port, workers_port, apart_port = (
        free_port() for _ in range(7)
    )
    floor_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    with (
        database() as dsn,
        database(durable=False) as loose_dsn,
        tempfile.TemporaryDirectory() as home,
        tempfile.TemporaryDirectory() as other_home,
        tempfile.TemporaryDirectory() as loose_home,
    ):
        for each in (dsn, loose_dsn):
            migrate.upgrade(each)
        key, flood_key = asyncio.run(bench_users(dsn))
        if loose_dsn != dsn:
            asyncio.run(_copy_users(dsn, loose_dsn))
        # Proxies on one database share the backends' slots through it (as they should): each
        # proxy measured here gets a database of its own, a copy of the first, so that each is
        # alone there, as one proxy in front of its backend is.
        unjournaled_dsn = asyncio.run(copy_database(dsn, "bench_unjournaled"))
        workers_dsn = asyncio.run(copy_database(dsn, "bench_workers"))
        apart_dsn = asyncio.run(copy_database(dsn, "bench_apart"))
        gate_env = {
            "POSTGRES_AUTH_DSN": dsn, "LLAMA_GATE_HOME": home,
            "LLAMA_SERVER_HOST": "127.0.0.1", "LLAMA_SERVER_PORT": str(up_port),
            "LLAMA_SERVER_API_KEY": BACKEND_KEY, "LLAMA_PROXY_RATE_LIMIT": "1000000",
            "LLAMA_PROXY_METRICS_PORT": "0", "LLAMA_PROXY_DASHBOARD_PORT": "0",
            "LLAMA_PROXY_MAX_CONCURRENT": "1000", "LLAMA_BACKEND_SLOTS": "1000",
        }  # fmt: skip
        unjournaled_env = {
            **gate_env,
            "LLAMA_GATE_HOME": other_home,
            "LLAMA_PROXY_AUDIT_JOURNAL": "0",
            "POSTGRES_AUTH_DSN": unjournaled_dsn,
        }
        loose_env = {**gate_env, "LLAMA_GATE_HOME": loose_home, "POSTGRES_AUTH_DSN": loose_dsn}
        workers_env = {**gate_env, "LLAMA_PROXY_WORKERS": "2", "POSTGRES_AUTH_DSN": workers_dsn}
        apart_env = {**gate_env, "POSTGRES_AUTH_DSN": apart_dsn}

        def proxy(port: int, env: dict[str, str]) -> list[str]:
            return [python, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)]

        with (
            process([python, "bench/upstream.py", str(up_port)]) as up,
            process([python, "bench/passthrough.py", str(base_port), upstream_url]) as base,
            process(proxy(gate_port, gate_env), gate_env) as gate,
            process(proxy(unjournaled_port, unjournaled_env), unjournaled_env) as unjournaled,
            process(proxy(loose_port, loose_env), loose_env) as loose,
            process(proxy(workers_port, workers_env), workers_env) as workers,
            process(proxy(apart_port, apart_env), apart_env) as apart,
            process(
                [python, "bench/floor.py", str(floor_port), upstream_url, f"{home}/floor.jsonl"]
            ) as floor,
        ):
            wait_http(upstream_url, up, "/")
            wait_http(f"http://127.0.0.1:{base_port}", base, "/")
            wait_http(f"http://127.0.0.1:{floor_port}", floor, "/")
            for port, proc in ((gate_port, gate), (unjournaled_port, unjournaled),
                               (loose_port, loose), (workers_port, workers),
                               (apart_port, apart)):  # fmt: skip
                wait_http(f"http://127.0.0.1:{port}", proc, "/health")
            bearer = {"Authorization": f"Bearer {key}"}
            targets = {
                DIRECT: (f"{upstream_url}/v1/chat/completions", {}),
                BARE: (f"http://127.0.0.1:{base_port}/v1/chat/completions", {}),
                GATE: (f"http://127.0.0.1:{gate_port}/v1/chat/completions", bearer),
                NO_JOURNAL: (f"http://127.0.0.1:{unjournaled_port}/v1/chat/completions", bearer),
                NO_FSYNC: (f"http://127.0.0.1:{loose_port}/v1/chat/completions", bearer),
                WORKERS: (f"http://127.0.0.1:{workers_port}/v1/chat/completions", bearer),
                APART: (f"http://127.0.0.1:{apart_port}/v1/chat/completions", bearer),
                FLOOR: (
                    f"http://127.0.0.1:{floor_port}/v1/chat/completions",
                    {"Authorization": "Bearer floor-key"},
                ),
            }
            pids = {
                GATE: gate.pid, NO_JOURNAL: unjournaled.pid, NO_FSYNC: loose.pid,
                WORKERS: workers.pid, BARE: base.pid, FLOOR: floor.pid,
            }  # fmt: skip
            if args.workers_only:
                _report_workers(targets, pids, args.seconds)
                return
            if args.floor_only:
                _report_floor(targets, pids, args.seconds)
                return
            results: dict[tuple[str, str], Result] = {}
            cpu_us: dict[tuple[str, str], float] = {}
            journal = JournalCost()
            sent_through_gate = 0
            for load_name, concurrency, streamed in (
                ("json c=1", 1, False), ("json c=32", 32, False),
                ("sse c=1", 1, True), ("sse c=32", 32, True), (FIRST_EVENTS, 1, True),
            ):  # fmt: skip
                for target, (url, headers) in targets.items():
                    if args.journal_only:
                        break
                    if target in (WORKERS, APART, FLOOR):
                        continue  # --workers-only, --floor-only
                    if args.flood_only and (load_name, target) != ("sse c=1", GATE):
                        continue
                    before = cpu_seconds(pids[target]) if target in pids else 0.0
                    first = load_name == FIRST_EVENTS
                    if first and target not in (DIRECT, BARE, GATE):
                        continue
                    result = asyncio.run(
                        load(url, headers, concurrency, args.seconds, streamed, first)
                    )
                    if target in pids:
                        cpu = cpu_seconds(pids[target]) - before
                        cpu_us[(load_name, target)] = cpu / (result.count + concurrency) * 1e6
                    results[(load_name, target)] = result
                    if target in (GATE, NO_JOURNAL):
                        sent_through_gate += result.count + result.errors + concurrency  # + warm-up
            flood = None
            if not args.journal_only:
                url, headers = targets[GATE]
                flood = flood_load(url, headers, {"Authorization": f"Bearer {flood_key}"}, 10.0)
                sent_through_gate += flood[0].count + flood[0].errors + 1 + flood[1]
            # The journal's cost is a few percent: less than the run-to-run noise of a load on
            # cores shared with other work. So c and d take turns, several times, and besides
            # their throughput each proxy's own CPU time per request is counted, which other
            # work on the machine does not change.
            for _ in range(0 if args.flood_only else args.journal_rounds):
                for target in (GATE, NO_JOURNAL):
                    url, headers = targets[target]
                    before = cpu_seconds(pids[target])
                    result = asyncio.run(load(url, headers, 32, args.seconds / 2, False))
                    cpu = cpu_seconds(pids[target]) - before
                    journal.add(target, result.rps, cpu / (result.count + 32) * 1e6)
                    sent_through_gate += result.count + result.errors + 32
            time.sleep(2.5)  # the audit writer writes about once a second
            rows = asyncio.run(audit_rows(dsn)) + asyncio.run(audit_rows(unjournaled_dsn))
    journal.append_us = _append_us()
    if args.journal_only:
        _report_journal(journal)
        return
    assert flood is not None
    if args.flood_only:
        _report_flood(results[("sse c=1", GATE)], flood)
        return
    _report(results, cpu_us, flood, journal, sent_through_gate, rows)


def _report_flood(alone: Result, flood: tuple[Result, int]) -> None:
    flooded, bodies = flood
    for name, r in (("sse c=1 alone", alone), ("sse c=1, 8 MiB flood", flooded)):
        print(
            f"{name:<22} {r.count:>4} streams  gap err p50/p99/max "
            f"{r.pct(r.spacing_error, 0.5):.2f} / {r.pct(r.spacing_error, 0.99):.2f} / "
            f"{max(r.spacing_error, default=0) * 1000:.2f} ms  errors {r.errors}"
        )
        if r.error_kinds:
            print(f"  errors: {r.error_kinds}")
    added = flooded.pct(flooded.spacing_error, 0.99) - alone.pct(alone.spacing_error, 0.99)
    print(f"(8 MiB flood: {bodies} bodies of 8 MiB sent by another user, 4 at a time)")
    _print_checks([("gap p99 added by an 8 MiB flood (c)", f"{added:.2f} ms", "<= 10 ms",
                    added <= 10)])  # fmt: skip


async def _copy_users(source: str, target: str) -> None:
    """The benchmark's users and keys, the same in the other database."""
    src, dst = await asyncpg.connect(source), await asyncpg.connect(target)
    try:
        await dst.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        for table in ("users", "api_keys"):
            rows = await src.fetch(f"SELECT * FROM {table}")
            columns = list(rows[0].keys())
            await dst.copy_records_to_table(table, records=rows, columns=columns)
    finally:
        await src.close()
        await dst.close()


@dataclass
class JournalCost:
    """llama-gate with its journal (c) and without (d), json c=32, in alternating runs."""

    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # proxy CPU per request
    append_us: float = 0.0  # what `Journal.append` itself costs, measured in this process

    def add(self, target: str, rps: float, cpu_us: float) -> None:
        self.rps.setdefault(target, []).append(rps)
        self.cpu_us.setdefault(target, []).append(cpu_us)

    def median(self, figures: dict[str, list[float]], target: str) -> float:
        return statistics.median(figures[target])


def _append_us(rows: int = 50_000) -> float:
    """Microseconds one `Journal.append` takes (encode and write a typical row), best of 3."""
    row = AuditRow(
        request_id=uuid.uuid4().hex, created_at=datetime.now(UTC), user_id=1, username="bench",
        key_id="0123456789abcdef", method="POST", path="/v1/chat/completions", model="smollm2",
        stream=True, status_code=200, duration_ms=12.345678, ttfb_ms=3.21, queue_ms=0.12,
        request_bytes=120, response_bytes=3000, prompt_tokens=10, completion_tokens=16,
        client_addr="127.0.0.1", error=None, client_request_id=None, backend="default",
    )  # fmt: skip
    best = float("inf")
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(3):
            journal = Journal(Path(folder))
            started = time.perf_counter()
            for _ in range(rows):
                journal.append(row)
            best = min(best, (time.perf_counter() - started) / rows * 1e6)
            journal.close()
    return best


async def _split(
    targets: dict[str, tuple[str, dict[str, str]]], concurrency: int, seconds: float
) -> Result:
    """The load sent half to c's proxy and half to the other lone one, counted as one."""
    halves = [max(1, concurrency // 2), max(1, concurrency - concurrency // 2)]
    parts = await asyncio.gather(
        *(
            load(targets[target][0], targets[target][1], half, seconds, False)
            for target, half in zip((GATE, APART), halves, strict=True)
        )
    )
    return Result(
        latencies=[x for part in parts for x in part.latencies],
        elapsed=max(part.elapsed for part in parts),
        errors=sum(part.errors for part in parts),
    )


def _rounds(
    targets: dict[str, tuple[str, dict[str, str]]],
    pids: dict[str, int],
    shown: tuple[str, ...],
    seconds: float,
) -> dict[tuple[str, str], list[float]]:
    """JSON loads at c=1 and c=32 through each of `shown`, in turns, three rounds; the table
    printed (req/s and CPU a request, medians of 3), and each load's req/s returned."""
    rps: dict[tuple[str, str], list[float]] = {}
    cpu_us: dict[tuple[str, str], list[float]] = {}
    idle: dict[tuple[str, str], list[float]] = {}
    for _ in range(3):
        for load_name, concurrency in (("json c=1", 1), ("json c=32", 32)):
            for target in shown:
                if target == APART and concurrency < 2:
                    continue  # split, one request at a time is two at a time
                url, headers = targets[target]
                before = cpu_seconds(pids[target]) if target in pids else 0.0
                idle_before = ticks()
                if target == APART:  # c's proxy and another like it, half the load each
                    result = asyncio.run(_split(targets, concurrency, seconds))
                else:
                    result = asyncio.run(load(url, headers, concurrency, seconds, False))
                idle.setdefault((load_name, target), []).append(idle_since(idle_before))
                rps.setdefault((load_name, target), []).append(result.rps)
                if target in pids:
                    cpu = cpu_seconds(pids[target]) - before
                    per = cpu / (result.count + concurrency) * 1e6
                    cpu_us.setdefault((load_name, target), []).append(per)
    head = ("load", "path", "req/s (median of 3)", "CPU us/req", "machine idle")
    print("{:<10} {:<36} {:>20} {:>11} {:>13}".format(*head))
    for (load_name, target), runs in rps.items():
        cpu = cpu_us.get((load_name, target))
        shown_cpu = f"{statistics.median(cpu):.0f}" if cpu else "-"
        spare = statistics.median(idle[(load_name, target)])
        print(
            f"{load_name:<10} {target:<36} {statistics.median(runs):>20.0f} {shown_cpu:>11} "
            f"{spare:>13.0%}"
        )
    print()
    return rps


def _report_workers(
    targets: dict[str, tuple[str, dict[str, str]]], pids: dict[str, int], seconds: float
) -> None:
    """JSON loads through a, b, c (one worker) and f (two), in turns, three rounds of each."""
    time.sleep(3)  # the workers have switched to shared slots
    rps = _rounds(targets, pids, (DIRECT, BARE, GATE, WORKERS, APART), seconds)

    def median(target: str) -> float:
        return statistics.median(rps[("json c=32", target)])

    two = median(WORKERS) / median(GATE)
    bare = median(WORKERS) / median(BARE)
    bound = median(APART) / median(GATE)
    _print_checks(
        [
            ("c=32 json, 2 workers / 1 (f / c)", f"{two:.2f} x", ">= 1.60 x", two >= 1.6),
            ("c=32 json, 2 workers / bare (f / b)", f"{bare:.2f} x", "-", None),
            ("c=32 json, 2 processes sharing nothing / 1 (g / c)", f"{bound:.2f} x", "-", None),
        ]
    )


def _report_floor(
    targets: dict[str, tuple[str, dict[str, str]]], pids: dict[str, int], seconds: float
) -> None:
    """JSON loads through a, b, h (the floor) and c, in turns, three rounds of each."""
    rps = _rounds(targets, pids, (DIRECT, BARE, FLOOR, GATE), seconds)

    def median(target: str) -> float:
        return statistics.median(rps[("json c=32", target)])

    floor, gate = median(FLOOR) / median(BARE), median(GATE) / median(BARE)
    _print_checks(
        [
            ("c=32 json, the floor / bare (h / b)", f"{floor:.2f} x", "-", None),
            ("c=32 json, llama-gate / bare (c / b)", f"{gate:.2f} x", ">= 0.70 x", gate >= 0.7),
            ("c=32 json, llama-gate / the floor (c / h)", f"{gate / floor:.2f} x", "-", None),
        ]
    )


def _report(
    results: dict[tuple[str, str], Result],
    cpu_us: dict[tuple[str, str], float],
    flood: tuple[Result, int],
    journal: JournalCost,
    sent: int,
    rows: int,
) -> None:
    head = ("load", "path", "req/s", "p50 ms", "p99 ms", "ttfb p50", "gap err p99/max ms",
            "errors", "CPU us/req")  # fmt: skip
    print("{:<10} {:<31} {:>7} {:>8} {:>8} {:>9} {:>19} {:>6} {:>10}".format(*head))
    flooded, bodies = flood
    rows_shown = [*results.items(), (("sse c=1, 8 MiB flood", GATE), flooded)]
    for (load_name, target), r in rows_shown:
        ttfb = f"{r.pct(r.ttfb, 0.5):.2f}" if r.ttfb else "-"
        gap = "-"
        if r.spacing_error:
            gap = f"{r.pct(r.spacing_error, 0.99):.2f} / {max(r.spacing_error) * 1000:.2f}"
        p50, p99 = r.pct(r.latencies, 0.5), r.pct(r.latencies, 0.99)
        cpu = cpu_us.get((load_name, target))
        shown = f"{cpu:.0f}" if cpu is not None else "-"
        print(
            f"{load_name:<10} {target:<31} {r.rps:>7.0f} {p50:>8.2f} {p99:>8.2f} {ttfb:>9} "
            f"{gap:>19} {r.errors:>6} {shown:>10}"
        )
    print(f"(8 MiB flood: {bodies} bodies of 8 MiB sent by another user, 4 at a time)\n")
    direct, base = DIRECT, BARE

    def p50(load_name: str, target: str, ttfb: bool = False) -> float:
        r = results[(load_name, target)]
        return r.pct(r.ttfb if ttfb else r.latencies, 0.5)

    def gap(load_name: str, target: str) -> float:
        return max(results[(load_name, target)].spacing_error) * 1000

    def ratio(target: str) -> float:
        return results[("json c=32", target)].rps / results[("json c=32", base)].rps

    added_p50 = p50("json c=1", GATE) - p50("json c=1", direct)
    bare_p50 = p50("json c=1", base) - p50("json c=1", direct)
    added_ttfb = p50(FIRST_EVENTS, GATE, ttfb=True) - p50(FIRST_EVENTS, direct, ttfb=True)
    bare_ttfb = p50(FIRST_EVENTS, base, ttfb=True) - p50(FIRST_EVENTS, direct, ttfb=True)
    few = p50("sse c=1", GATE, ttfb=True) - p50("sse c=1", direct, ttfb=True)
    streams = len(results[(FIRST_EVENTS, GATE)].ttfb)
    spacing_c32 = gap("sse c=32", GATE) - gap("sse c=32", direct)
    alone = results[("sse c=1", GATE)]
    flood_gap = flooded.pct(flooded.spacing_error, 0.99) - alone.pct(alone.spacing_error, 0.99)
    checks: list[Check] = [
        ("c=1 added p50 (c - a), bare's (b - a)", f"{added_p50:.2f} / {bare_p50:.2f} ms",
         "<= 2 x bare", added_p50 <= 2 * bare_p50),
        ("c=32 json throughput (c / b)", f"{ratio(GATE):.2f} x", ">= 0.70 x", ratio(GATE) >= 0.7),
        ("  with Postgres not fsyncing (e / b)", f"{ratio(NO_FSYNC):.2f} x", "-", None),
        (f"c=1 added TTFB, p50 of {streams} streams (c - a)", f"{added_ttfb:.2f} ms",
         "<= 1.5 ms", added_ttfb <= 1.5),
        ("  bare's (b - a); c's from sse c=1's streams", f"{bare_ttfb:.2f}; {few:.2f} ms",
         "-", None),
        ("c=32 max added SSE gap (c - a)", f"{spacing_c32:.2f} ms", "<= 2 ms", spacing_c32 <= 2),
        ("c=32 json proxy CPU per request (c)", f"{cpu_us[('json c=32', GATE)]:.0f} us", "-",
         None),
        ("gap p99 added by an 8 MiB flood (c)", f"{flood_gap:.2f} ms", "<= 10 ms",
         flood_gap <= 10),
        *_journal_checks(journal),
        ("audit rows written / requests sent", f"{rows} / {sent}", "equal", rows == sent),
    ]  # fmt: skip
    _print_checks(checks)
    _print_journal_runs(journal)


Check = tuple[str, str, str, bool | None]  # figure, measured, target, met (None: no target)


def _journal_checks(journal: JournalCost) -> list[Check]:
    gate = "c: llama-gate"
    rps_ratio = journal.median(journal.rps, gate) / journal.median(journal.rps, NO_JOURNAL)
    cpu_on = journal.median(journal.cpu_us, gate)
    cpu_off = journal.median(journal.cpu_us, NO_JOURNAL)
    cost = cpu_off / cpu_on  # the throughput a CPU-bound proxy keeps with the journal on
    share = journal.append_us / cpu_on
    return [
        ("journal: c=32 req/s, median on / off", f"{rps_ratio:.3f} x", "(noisy)", None),
        ("journal: proxy CPU us/req, on / off", f"{cpu_on:.0f} / {cpu_off:.0f}", "", None),
        ("journal: throughput kept (CPU off / on)", f"{cost:.3f} x", ">= 0.95 x", cost >= 0.95),
        ("journal: one append, share of c's CPU/req", f"{journal.append_us:.1f} us {share:.1%}",
         "< 5 %", share < 0.05),
    ]  # fmt: skip


def _print_checks(checks: list[Check]) -> None:
    print(f"{'figure':<42} {'measured':>16} {'target':>12}  met")
    for name, measured, target, met in checks:
        verdict = "-" if met is None else "yes" if met else "NO"
        print(f"{name:<42} {measured:>16} {target:>12}  {verdict}")


def _print_journal_runs(journal: JournalCost) -> None:
    rounds = len(journal.rps[NO_JOURNAL])
    print(f"\njournal runs, json c=32, {rounds} each, alternating (c: on, d: off):")
    for target in ("c: llama-gate", NO_JOURNAL):
        runs = zip(journal.rps[target], journal.cpu_us[target], strict=True)
        print(f"  {target[0]}: " + ", ".join(f"{rps:.0f} req/s {cpu:.0f} us" for rps, cpu in runs))


def _report_journal(journal: JournalCost) -> None:
    _print_checks(_journal_checks(journal))
    _print_journal_runs(journal)


if __name__ == "__main__":
    main()
