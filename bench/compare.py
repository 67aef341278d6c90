"""Two checkouts of llama-gate side by side: the same loads through a proxy of each, in turns,
in one run, so that what this machine's speed does between runs falls on both alike.

    runtime/.venv/bin/python bench/compare.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 5]

For example, the commit before a change against the working tree:

    git worktree add /tmp/before HEAD~3
    runtime/.venv/bin/python bench/compare.py /tmp/before

Each proxy runs from its checkout with this checkout's Python environment, on its own copy of
one throwaway Postgres with default durability, in front of one fake backend
(`bench/upstream.py`). Loads: JSON at c=32 and c=1, and one stream at a time (its time to first
byte); for each, the medians over the rounds of requests a second, the proxy's CPU time a
request, and the latency (or TTFB) p50, besides each round's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402
from harness import (  # noqa: E402
    BACKEND_KEY,
    bench_users,
    copy_database,
    cpu_seconds,
    load,
    process,
    wait_http,
)

from proxy.db import migrate  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402

LOADS = (("json c=32", 32, False, 4.0), ("json c=1", 1, False, 4.0), ("sse c=1", 1, True, 5.0))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path, help="the checkout to compare against")
    parser.add_argument("new", type=Path, nargs="?", default=ROOT, help="default: this one")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each load (default 5)")
    args = parser.parse_args()
    for checkout in (args.old, args.new):
        if not (checkout / "proxy" / "__main__.py").is_file():
            raise SystemExit(f"{checkout} is not a llama-gate checkout (no proxy/__main__.py)")
    python = sys.executable
    up_port, old_port, new_port = free_port(), free_port(), free_port()
    with (
        database() as dsn,
        tempfile.TemporaryDirectory() as old_home,
        tempfile.TemporaryDirectory() as new_home,
    ):
        migrate.upgrade(dsn)
        key, _ = asyncio.run(bench_users(dsn))
        new_dsn = asyncio.run(copy_database(dsn, "bench_compare_new"))
        common = {
            "LLAMA_SERVER_HOST": "127.0.0.1", "LLAMA_SERVER_PORT": str(up_port),
            "LLAMA_SERVER_API_KEY": BACKEND_KEY, "LLAMA_PROXY_RATE_LIMIT": "1000000",
            "LLAMA_PROXY_METRICS_PORT": "0", "LLAMA_PROXY_DASHBOARD_PORT": "0",
            "LLAMA_PROXY_MAX_CONCURRENT": "1000", "LLAMA_BACKEND_SLOTS": "1000",
        }  # fmt: skip
        old_env = {**common, "POSTGRES_AUTH_DSN": dsn, "LLAMA_GATE_HOME": old_home}
        new_env = {**common, "POSTGRES_AUTH_DSN": new_dsn, "LLAMA_GATE_HOME": new_home}

        def proxy(port: int) -> list[str]:
            return [python, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)]

        with (
            process([python, "bench/upstream.py", str(up_port)]) as up,
            process(proxy(old_port), old_env, cwd=args.old) as old,
            process(proxy(new_port), new_env, cwd=args.new) as new,
        ):
            wait_http(f"http://127.0.0.1:{up_port}", up, "/")
            for port, proc in ((old_port, old), (new_port, new)):
                wait_http(f"http://127.0.0.1:{port}", proc, "/health")
            proxies = {"old": (old_port, old), "new": (new_port, new)}
            print(f"old: {args.old}\nnew: {args.new}\n")
            for name, concurrency, streamed, seconds in LOADS:
                figures = _turns(proxies, key, concurrency, streamed, seconds, args.rounds)
                for which, rounds in figures.items():
                    _print(name, which, streamed, rounds)


def _turns(
    proxies: dict[str, tuple[int, subprocess.Popen[bytes]]],
    key: str,
    concurrency: int,
    streamed: bool,
    seconds: float,
    rounds: int,
) -> dict[str, list[tuple[float, float, float]]]:
    """Each proxy's (req/s, CPU us a request, latency or TTFB p50 ms) of each round; the
    proxies take turns, the first of a round alternating."""
    figures: dict[str, list[tuple[float, float, float]]] = {which: [] for which in proxies}
    headers = {"Authorization": f"Bearer {key}"}
    for number in range(rounds):
        order = list(proxies) if number % 2 == 0 else list(reversed(proxies))
        for which in order:
            port, proc = proxies[which]
            before = cpu_seconds(proc.pid)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            result = asyncio.run(load(url, headers, concurrency, seconds, streamed))
            cpu_us = (cpu_seconds(proc.pid) - before) / (result.count + concurrency) * 1e6
            times = result.ttfb if streamed else result.latencies
            figures[which].append((result.rps, cpu_us, statistics.median(times) * 1000))
    return figures


def _print(
    load_name: str, which: str, streamed: bool, rounds: list[tuple[float, float, float]]
) -> None:
    rps = statistics.median(r[0] for r in rounds)
    cpu = statistics.median(r[1] for r in rounds)
    p50 = statistics.median(r[2] for r in rounds)
    each = ", ".join(f"{r[0]:.0f}/{r[1]:.0f}" for r in rounds)
    what = "ttfb" if streamed else "latency"
    print(
        f"{load_name:10s} {which}: {rps:7.1f} req/s  {cpu:5.0f} us CPU/req  {what} p50 "
        f"{p50:6.2f} ms   (each round req/s / us: {each})"
    )


if __name__ == "__main__":
    main()
