"""What llama-gate costs: the same load straight to a backend, through a bare pass-through, and
through llama-gate (real key, rate limits on, audit rows written to Postgres), in one run; and
llama-gate once more without its audit journal, to show what the journal costs.

    runtime/.venv/bin/python bench/overhead.py [--seconds 5]

Starts its own fake backend, baseline and proxy processes (and a throwaway Postgres unless
BENCH_DATABASE_URL names one), then prints one table. Everything runs on this machine, so the
load generator shares the cores with what it measures; compare rows, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402

from proxy.audit.journal import Journal  # noqa: E402
from proxy.audit.row import AuditRow  # noqa: E402
from proxy.auth.apikeys import KeyHasher, generate_key  # noqa: E402
from proxy.db import migrate, queries  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402

BACKEND_KEY = "bench-backend-key"
NO_JOURNAL = "d: llama-gate, no journal"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
STREAM = {**CHAT, "messages": [{"role": "user", "content": "stream slowly"}], "stream": True}


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds
    ttfb: list[float] = field(default_factory=list)
    spacing_error: list[float] = field(default_factory=list)  # |client gap - sender gap|, s
    elapsed: float = 0.0
    errors: int = 0

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


async def load(
    url: str, headers: dict[str, str], concurrency: int, seconds: float, streamed: bool
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
                    if streamed:
                        result.latencies.append(await _stream(client, url, headers, result))
                    else:
                        result.latencies.append(await _plain(client, url, headers))
                except (aiohttp.ClientError, RuntimeError):
                    result.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


def _wait_http(url: str, process: subprocess.Popen[bytes], path: str = "") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"{process.args} exited: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            urllib.request.urlopen(url + path, timeout=1).close()  # noqa: S310
            return
        except urllib.error.HTTPError:
            return  # it answers; the status does not matter
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _prepare(dsn: str) -> str:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        user = await queries.create_user(con, "bench", 1_000_000, 60)
        key = generate_key()
        await queries.insert_key(
            con, user["id"], key.key_id, KeyHasher().hash(key.secret), None, None
        )
    finally:
        await con.close()
    return key.full.reveal()


async def _rows(dsn: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval("SELECT count(*) FROM llama_requests"))
    finally:
        await con.close()


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
    args = parser.parse_args()
    python = sys.executable
    up_port, base_port, gate_port, unjournaled_port = (free_port() for _ in range(4))
    upstream_url = f"http://127.0.0.1:{up_port}"
    with (
        database() as dsn,
        tempfile.TemporaryDirectory() as home,
        tempfile.TemporaryDirectory() as other_home,
    ):
        migrate.upgrade(dsn)
        key = asyncio.run(_prepare(dsn))
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
        }
        with (
            process([python, "bench/upstream.py", str(up_port)]) as up,
            process([python, "bench/passthrough.py", str(base_port), upstream_url]) as base,
            process(
                [python, "-m", "proxy", "--host", "127.0.0.1", "--port", str(gate_port)], gate_env
            ) as gate,
            process(
                [python, "-m", "proxy", "--host", "127.0.0.1", "--port", str(unjournaled_port)],
                unjournaled_env,
            ) as unjournaled,
        ):
            _wait_http(upstream_url, up, "/")
            _wait_http(f"http://127.0.0.1:{base_port}", base, "/")
            _wait_http(f"http://127.0.0.1:{gate_port}", gate, "/health")
            _wait_http(f"http://127.0.0.1:{unjournaled_port}", unjournaled, "/health")
            targets = {
                "a: direct": (f"{upstream_url}/v1/chat/completions", {}),
                "b: bare pass-through": (f"http://127.0.0.1:{base_port}/v1/chat/completions", {}),
                "c: llama-gate": (
                    f"http://127.0.0.1:{gate_port}/v1/chat/completions",
                    {"Authorization": f"Bearer {key}"},
                ),
                NO_JOURNAL: (
                    f"http://127.0.0.1:{unjournaled_port}/v1/chat/completions",
                    {"Authorization": f"Bearer {key}"},
                ),
            }
            results: dict[tuple[str, str], Result] = {}
            journal = JournalCost()
            sent_through_gate = 0
            for load_name, concurrency, streamed in (
                ("json c=1", 1, False), ("json c=32", 32, False),
                ("sse c=1", 1, True), ("sse c=32", 32, True),
            ):  # fmt: skip
                for target, (url, headers) in targets.items():
                    if args.journal_only:
                        break
                    result = asyncio.run(load(url, headers, concurrency, args.seconds, streamed))
                    results[(load_name, target)] = result
                    if target.startswith(("c", "d")):
                        sent_through_gate += result.count + result.errors + concurrency  # + warm-up
            # The journal's cost is a few percent: less than the run-to-run noise of a load on
            # cores shared with other work. So c and d take turns, several times, and besides
            # their throughput each proxy's own CPU time per request is counted, which other
            # work on the machine does not change.
            pids = {"c: llama-gate": gate.pid, NO_JOURNAL: unjournaled.pid}
            for _ in range(args.journal_rounds):
                for target in pids:
                    url, headers = targets[target]
                    before = _cpu_seconds(pids[target])
                    result = asyncio.run(load(url, headers, 32, args.seconds / 2, False))
                    cpu = _cpu_seconds(pids[target]) - before
                    journal.add(target, result.rps, cpu / (result.count + 32) * 1e6)
                    sent_through_gate += result.count + result.errors + 32
            time.sleep(2.5)  # the audit writer writes about once a second
            rows = asyncio.run(_rows(dsn))
    journal.append_us = _append_us()
    if args.journal_only:
        _report_journal(journal)
        return
    _report(results, journal, sent_through_gate, rows)


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


def _cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of a process and its threads so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(
    results: dict[tuple[str, str], Result], journal: JournalCost, sent: int, rows: int
) -> None:
    head = ("load", "path", "req/s", "p50 ms", "p99 ms", "ttfb p50", "gap err p99/max ms", "errors")
    print("{:<10} {:<22} {:>8} {:>8} {:>8} {:>9} {:>19} {:>6}".format(*head))
    for (load_name, target), r in results.items():
        ttfb = f"{r.pct(r.ttfb, 0.5):.2f}" if r.ttfb else "-"
        gap = "-"
        if r.spacing_error:
            gap = f"{r.pct(r.spacing_error, 0.99):.2f} / {max(r.spacing_error) * 1000:.2f}"
        p50, p99 = r.pct(r.latencies, 0.5), r.pct(r.latencies, 0.99)
        print(
            f"{load_name:<10} {target:<22} {r.rps:>8.0f} {p50:>8.2f} {p99:>8.2f} {ttfb:>9} "
            f"{gap:>19} {r.errors:>6}"
        )
    print()
    gate, direct, base = "c: llama-gate", "a: direct", "b: bare pass-through"

    def p50(load_name: str, target: str, ttfb: bool = False) -> float:
        r = results[(load_name, target)]
        return r.pct(r.ttfb if ttfb else r.latencies, 0.5)

    def gap(load_name: str, target: str) -> float:
        return max(results[(load_name, target)].spacing_error) * 1000

    added_p50 = p50("json c=1", gate) - p50("json c=1", direct)
    ratio = results[("json c=32", gate)].rps / results[("json c=32", base)].rps
    added_ttfb = p50("sse c=1", gate, ttfb=True) - p50("sse c=1", direct, ttfb=True)
    spacing = gap("sse c=1", gate) - gap("sse c=1", direct)
    spacing_c32 = gap("sse c=32", gate) - gap("sse c=32", direct)
    checks = [
        ("c=1 added p50 latency (c - a)", f"{added_p50:.3f} ms", "<= 0.35 ms", added_p50 <= 0.35),
        ("c=32 throughput vs baseline (c / b)", f"{ratio:.2f} x", ">= 0.60 x", ratio >= 0.6),
        ("c=1 added TTFB, streamed (c - a)", f"{added_ttfb:.3f} ms", "<= 1 ms", added_ttfb <= 1),
        ("c=1 max added SSE gap error (c - a)", f"{spacing:.3f} ms", "<= 1 ms", spacing <= 1),
        ("c=32 max added SSE gap error (c - a)", f"{spacing_c32:.3f} ms", "(no target)", None),
        *_journal_checks(journal),
        ("audit rows written / requests sent", f"{rows} / {sent}", "equal", rows == sent),
    ]
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
    print(f"{'figure':<42} {'measured':>14} {'target':>12}  met")
    for name, measured, target, met in checks:
        verdict = "-" if met is None else "yes" if met else "NO"
        print(f"{name:<42} {measured:>14} {target:>12}  {verdict}")


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
