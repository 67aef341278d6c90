"""Do conversations stay warm when several people share one model? Through llama-gate, to SmolLM2.

    runtime/.venv/bin/python bench/conversations.py [--users 4] [--turns 8] [--n-ctx 4096]

U users (default 4) each hold a conversation of T turns (default 8) with the real backend
(`python -m backend serve`, SmolLM2-135M) through the real proxy (keys, Postgres audit rows: a
throwaway database unless BENCH_DATABASE_URL names one). Each turn adds ~150 tokens of user text
and asks for a short answer (`--answer-tokens`, default 24, temperature 0), streamed. The turns
are interleaved round-robin: user 1's turn t, then user 2's, ..., each sent when the one before has
been answered, so the time to first token (TTFT) is the model reading the prompt, not a wait in
the queue. Three runs, each on a freshly started backend:

- alone: one user's conversation, default settings;
- interleaved, cache off: all U users with LLAMA_PROMPT_CACHE=off (what llama-gate had before);
- interleaved, defaults: all U users with the default settings (the prompt cache in RAM).

It prints each turn's TTFT (the median over users), the share of prompt tokens of turns >= 2
served from the cache (from each answer's `usage.prompt_tokens_details.cached_tokens`, checked
against the `cached_tokens` column of the audit rows), the backend's resident memory after each
run, and the targets: interleaved TTFT at the last turn <= 1.5x the lone user's at the same turn;
>= 90 % of the prompt tokens of turns >= 2 from the cache; resident memory within the cache's
budget plus the model file, beyond what the same backend holds with the cache off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.auth.apikeys import KeyHasher, generate_key  # noqa: E402
from proxy.db import accounts, migrate  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402
from proxy.settings import KNOWN_VARIABLES, load_settings  # noqa: E402

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = GGUF.stem
SYSTEM = "You are a helpful assistant. Answer in one or two short sentences."
TOPICS = [
    "lighthouses and the keepers who lived in them on rocky islands",
    "baking sourdough bread with a starter kept alive for years",
    "the openings of chess and why the centre of the board matters",
    "growing tomatoes on a balcony in a windy city",
    "the migration of birds across the sea in autumn",
    "repairing an old bicycle with simple tools",
    "the history of maps drawn by sailors",
    "keeping bees in a small garden",
]
# ~150 tokens of user text per turn: a question on the user's topic wrapped in plain sentences.
FILLER = (
    "I have been reading about this for a while and I keep coming back to the same questions. "
    "My friends think it is a strange thing to care about, but I find the details fascinating, "
    "especially the parts that nobody seems to write down properly. Last week I spent an "
    "evening going through old notes, comparing what different people said, and I noticed that "
    "the explanations rarely agree with each other. Some of them are clearly guesses. "
)


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Run:
    name: str
    turns: dict[str, list[Turn]] = field(default_factory=dict)  # by user
    rss: int = 0  # the backend's resident bytes after the run
    rss_idle: int = 0  # ... and once it had started, before any request
    cache: dict[str, Any] = field(default_factory=dict)  # its /health prompt_cache
    rows_cached: int = 0  # cached_tokens summed over the audit rows of turns >= 2
    rows_prompt: int = 0


def _ask(user: int, turn: int) -> str:
    topic = TOPICS[user % len(TOPICS)]
    return f"Question {turn + 1} about {topic}. {FILLER}What should I know next about {topic}?"


# -- the backend: `python -m backend serve`, as a subprocess -------------------------------------


@dataclass(frozen=True)
class Backend:
    url: str
    key: str
    pid: int


def _health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310
            body: dict[str, Any] = json.load(response)
            return body
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@contextmanager
def backend(n_ctx: int, **settings: str) -> Iterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="llama-gate-bench-") as tmp:
        home = Path(tmp)
        (home / "models").mkdir()
        (home / "models" / GGUF.name).symlink_to(GGUF)
        port, key = free_port(), secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES | {"CONFIG_FILE"}}
        env.update(
            LLAMA_GATE_HOME=str(home), LLAMA_SERVER_PORT=str(port), LLAMA_SERVER_API_KEY=key,
            N_CTX=str(n_ctx), N_THREADS="2", **settings,
        )  # fmt: skip
        log = (home / "backend.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while _health(url) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "backend.log").read_text())
                time.sleep(0.2)
            yield Backend(url, key, process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the proxy, in this process ------------------------------------------------------------------


@asynccontextmanager
async def proxy(dsn: str, server: Backend) -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory() as home:
        environ = {
            "POSTGRES_AUTH_DSN": dsn, "LLAMA_SERVER_URLS": server.url,
            "LLAMA_SERVER_API_KEY": server.key, "LLAMA_PROXY_METRICS_PORT": "0",
            "LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS": "900",
            "LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS": "900",
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


async def make_users(dsn: str, count: int) -> list[str]:
    con = await asyncpg.connect(dsn)
    keys = []
    try:
        await con.execute("TRUNCATE llama_requests, api_keys, users CASCADE")
        for user in range(count):
            row = await accounts.create_user(con, f"user{user}", 1_000_000, 60)
            key = generate_key()
            await accounts.insert_key(
                con, row["id"], key.key_id, KeyHasher().hash(key.secret), None, None
            )
            keys.append(key.full.reveal())
    finally:
        await con.close()
    return keys


async def one_turn(
    client: aiohttp.ClientSession, url: str, key: str, messages: list[dict[str, str]],
    answer_tokens: int,
) -> tuple[str, Turn]:  # fmt: skip
    body = {
        "model": MODEL, "messages": messages, "max_tokens": answer_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.monotonic()
    first: float | None = None
    text, usage = "", None
    async with client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece and first is None:
                    first = time.monotonic()
                text += piece or ""
    assert usage is not None, "no usage in the stream"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    ttft = (first or time.monotonic()) - sent
    return text, Turn(ttft, usage["prompt_tokens"], usage["completion_tokens"], cached)


async def conversations(url: str, keys: list[str], turns: int, answer_tokens: int) -> Run:
    run = Run("")
    chats = [[{"role": "system", "content": SYSTEM}] for _ in keys]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as client:
        for turn in range(turns):
            for user, key in enumerate(keys):  # round-robin: each after the one before
                chats[user].append({"role": "user", "content": _ask(user, turn)})
                text, result = await one_turn(client, url, key, chats[user], answer_tokens)
                chats[user].append({"role": "assistant", "content": text})
                run.turns.setdefault(f"user{user}", []).append(result)
    return run


async def audit_figures(dsn: str, users: int, turns: int) -> tuple[int, int]:
    """cached_tokens and prompt_tokens summed over the audit rows of turns >= 2."""
    con = await asyncpg.connect(dsn)
    try:
        for _ in range(100):  # the audit writer flushes in the background
            rows = await con.fetch(
                "SELECT username, prompt_tokens, cached_tokens FROM llama_requests ORDER BY id"
            )
            if len(rows) >= users * turns:
                break
            await asyncio.sleep(0.1)
        await con.execute("TRUNCATE llama_requests")
    finally:
        await con.close()
    later = [row for i, row in enumerate(rows) if i >= users]  # round-robin: first U are turn 1
    return sum(r["cached_tokens"] or 0 for r in later), sum(r["prompt_tokens"] for r in later)


async def one_run(
    dsn: str, keys: list[str], name: str, n_ctx: int, turns: int, answer_tokens: int,
    **settings: str,
) -> Run:  # fmt: skip
    with backend(n_ctx, **settings) as server:
        idle = resident_bytes(server.pid)
        async with proxy(dsn, server) as url:
            run = await conversations(url, keys, turns, answer_tokens)
        run.name = name
        run.rss, run.rss_idle = resident_bytes(server.pid), idle
        run.cache = (_health(server.url) or {}).get("prompt_cache", {})
    run.rows_cached, run.rows_prompt = await audit_figures(dsn, len(keys), turns)
    return run


def report(alone: Run, off: Run, warm: Run, users: int, turns: int, n_ctx: int) -> None:
    def median_ttft(run: Run, turn: int) -> float:
        return statistics.median(t[turn].ttft for t in run.turns.values())

    def share(run: Run) -> float:
        cached = sum(t.cached_tokens for ts in run.turns.values() for t in ts[1:])
        prompt = sum(t.prompt_tokens for ts in run.turns.values() for t in ts[1:])
        return cached / prompt if prompt else 0.0

    def of_reusable(run: Run) -> float:
        """Cached tokens over those a cache could hold: each turn's previous prompt and answer
        (the new user text is new to any cache)."""
        cached = sum(t.cached_tokens for ts in run.turns.values() for t in ts[1:])
        reusable = sum(
            min(now.prompt_tokens, before.prompt_tokens + before.completion_tokens)
            for ts in run.turns.values()
            for before, now in pairwise(ts)
        )
        return cached / reusable if reusable else 0.0

    print(
        f"SmolLM2-135M Q4_1, n_ctx {n_ctx}; {users} users x {turns} turns interleaved "
        f"round-robin; TTFT in seconds (median over users)\n"
    )
    print(f"{'turn':>4} {'prompt tok':>10} {'alone':>8} {'off':>8} {'defaults':>9} {'cached':>7}")
    for turn in range(turns):
        prompt = statistics.median(t[turn].prompt_tokens for t in warm.turns.values())
        cached = sum(t[turn].cached_tokens for t in warm.turns.values()) / sum(
            t[turn].prompt_tokens for t in warm.turns.values()
        )
        print(
            f"{turn + 1:>4} {prompt:>10.0f} {median_ttft(alone, turn):>8.2f}"
            f" {median_ttft(off, turn):>8.2f} {median_ttft(warm, turn):>9.2f} {cached:>7.0%}"
        )
    print()
    mib = 2**20
    model = GGUF.stat().st_size
    budget = int(warm.cache.get("capacity_bytes", 0))
    head = ("run", "from cache", "(rows)", "of reusable", "RSS idle", "RSS end", "cache")
    print("{:<24} {:>10} {:>8} {:>11} {:>8} {:>8} {:>8}".format(*head))
    for run in (alone, off, warm):
        rows = run.rows_cached / run.rows_prompt if run.rows_prompt else 0.0
        cache_mib = int(run.cache.get("bytes", 0)) / mib
        print(
            f"{run.name:<24} {share(run):>10.1%} {rows:>8.1%} {of_reusable(run):>11.1%}"
            f" {run.rss_idle / mib:>8.0f} {run.rss / mib:>8.0f} {cache_mib:>8.1f}"
        )
    print("(memory in MiB; 'from cache': of all prompt tokens of turns >= 2, from the answers'")
    print(" usage and from the audit rows; 'of reusable': of the earlier turns' tokens in them)")
    print(f"cache budget {budget / mib:,.0f} MiB; model file {model / mib:.0f} MiB\n")
    last = turns - 1
    ratio = median_ttft(warm, last) / median_ttft(alone, last)
    growth = warm.rss - warm.rss_idle
    cold = median_ttft(off, last) / median_ttft(alone, last)
    figures = [
        (f"interleaved TTFT at turn {turns} / alone", f"{ratio:.2f} x", "<= 1.5 x", ratio <= 1.5),
        ("prompt tokens of turns >= 2 from cache", f"{share(warm):.1%}", ">= 90%",
         share(warm) >= 0.9),
        ("  of the earlier turns' tokens in them", f"{of_reusable(warm):.1%}", ">= 90%",
         of_reusable(warm) >= 0.9),
        ("backend RSS after the run", f"{warm.rss / mib:,.0f} MiB",
         f"<= {(budget + model) / mib:,.0f} MiB", warm.rss <= budget + model),
        ("  its growth while serving / cache bytes", f"{growth / mib:.0f} MiB",
         f"{int(warm.cache.get('bytes', 0)) / mib:.0f} MiB", None),
        (f"cache-off TTFT at turn {turns} / alone", f"{cold:.2f} x", "(baseline)", None),
    ]  # fmt: skip
    print(f"{'figure':<42} {'measured':>10} {'target':>14}  met")
    for name, measured, target, met in figures:
        verdict = "-" if met is None else "yes" if met else "NO"
        print(f"{name:<42} {measured:>10} {target:>14}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--answer-tokens", type=int, default=24)
    args = parser.parse_args()
    with database() as dsn:
        migrate.upgrade(dsn)
        keys = asyncio.run(make_users(dsn, args.users))
        common = (args.n_ctx, args.turns, args.answer_tokens)
        alone = asyncio.run(one_run(dsn, keys[:1], "alone", *common))
        off = asyncio.run(
            one_run(dsn, keys, "interleaved, cache off", *common, LLAMA_PROMPT_CACHE="off")
        )
        warm = asyncio.run(one_run(dsn, keys, "interleaved, defaults", *common))
    report(alone, off, warm, args.users, args.turns, args.n_ctx)


if __name__ == "__main__":
    main()
