"""What one hostile user costs everyone else: another user's latency alone, and while the first
sends the largest requests the limits allow.

The real stack: `python -m backend serve` with SmolLM2 (n_ctx 2048), `llama-gate serve` as its
own process, Postgres. `MAX_TOKENS_HARD_CAP` is 128 here so that the largest request, and so the
run, stays short; the embedding bounds are the defaults (128 inputs, 4096 tokens).

1. The service time S of the largest admitted request, alone: a chat whose prompt fills the
   context but for the answer's 128 tokens (`min_tokens` makes the model write all of them), and
   an embeddings request at both bounds. S is the longer.
2. The victim alone: small chats, one after the other.
3. The same while the attacker keeps its 4 concurrent places busy with the largest chats and
   embeddings (each prompt new, so no cache helps), a 7.5 MB chat body, a 7.5 MB count_tokens,
   a huge chat it hangs up on, and a grammar that used to kill the model server.

The fair queue lets one attacker request run at a time, so the victim waits at most for the one
running: its p99 may grow by S, and the target is 2 S. The backend's pid must not change.

    runtime/.venv/bin/python bench/hostile.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import database  # noqa: E402
from conversations import GGUF, MODEL, backend  # noqa: E402

from proxy.auth.apikeys import KeyHasher, generate_key  # noqa: E402
from proxy.db import accounts, migrate  # noqa: E402
from proxy.db.localpg import free_port  # noqa: E402
from proxy.settings import KNOWN_VARIABLES  # noqa: E402

N_CTX = 2048
ANSWER = 128
WORDS = (
    "river", "stone", "lamp", "orchard", "violet", "engine", "harbor", "quiet", "paper",
    "meadow", "copper", "signal",
)  # fmt: skip


def _words(count: int) -> str:
    rng = secrets.SystemRandom()
    return " ".join(rng.choice(WORDS) for _ in range(count))


@contextmanager
def proxy_process(dsn: str, backend_url: str, key: str) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llama-gate-bench-") as home:
        env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
        env.update(
            LLAMA_GATE_HOME=home, POSTGRES_AUTH_DSN=dsn, LLAMA_SERVER_URLS=backend_url,
            LLAMA_SERVER_API_KEY=key, LLAMA_PROXY_PORT=str(port), LLAMA_PROXY_HOST="127.0.0.1",
            LLAMA_PROXY_METRICS_PORT="0", LLAMA_PROXY_DASHBOARD_PORT="0",
            MAX_TOKENS_HARD_CAP=str(ANSWER), LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS="600",
        )  # fmt: skip
        log = Path(home) / "proxy.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy"], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    import urllib.request

                    urllib.request.urlopen(f"{url}/health", timeout=1)  # noqa: S310
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log.read_text()) from None
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


async def make_users(dsn: str) -> dict[str, str]:
    con = await asyncpg.connect(dsn)
    keys = {}
    try:
        for name in ("victim", "attacker"):
            row = await accounts.create_user(con, name, 1_000_000, 60)
            key = generate_key()
            hashed = KeyHasher().hash(key.secret)
            await accounts.insert_key(con, row["id"], key.key_id, hashed, None, None)
            keys[name] = key.full.reveal()
    finally:
        await con.close()
    return keys


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def count(client: aiohttp.ClientSession, url: str, key: str, text: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    async with client.post(f"{url}/v1/messages/count_tokens", json=body, headers=_auth(key)) as r:
        return int((await r.json())["input_tokens"])


async def largest_chat_body(client: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    """A chat whose prompt leaves the context exactly the answer's room."""
    words = 1200
    while True:
        text = _words(words)
        tokens = await count(client, url, key, text)
        if tokens > N_CTX - ANSWER - 24:
            break
        words += max(1, (N_CTX - ANSWER - 16 - tokens) // 2)
    while tokens > N_CTX - ANSWER:
        words -= 8
        text = _words(words)
        tokens = await count(client, url, key, text)
    return {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": ANSWER, "min_tokens": ANSWER, "temperature": 1.0}  # fmt: skip


def fresh(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with a new first word: no prompt cache can help it."""
    if "messages" in body:
        text = body["messages"][0]["content"]
        head = secrets.token_hex(4)
        return {**body, "messages": [{"role": "user", "content": f"{head} {text[9:]}"}]}
    return {**body, "input": [f"{secrets.token_hex(4)} {t[9:]}" for t in body["input"]]}


def largest_embeddings() -> dict[str, Any]:
    # 128 inputs of ~30 tokens: ~3,800 tokens, within the default 4,096.
    return {"model": MODEL, "input": [_words(22) for _ in range(128)]}


async def timed(client: aiohttp.ClientSession, url: str, key: str, path: str,
                body: dict[str, Any]) -> tuple[float, int]:  # fmt: skip
    started = time.monotonic()
    async with client.post(f"{url}{path}", json=body, headers=_auth(key)) as response:
        await response.read()
        return time.monotonic() - started, response.status


async def victim(client: aiohttp.ClientSession, url: str, key: str, seconds: float) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        took, status = await timed(client, url, key, "/v1/chat/completions", body)
        assert status == 200, status
        latencies.append(took)
    return latencies


async def attacker(
    client: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event,
    chat: dict[str, Any], statuses: Counter[str],
) -> None:  # fmt: skip
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x " * 3_750_000}]}
    count_body = {"model": MODEL, "messages": [{"role": "user", "content": "y " * 3_750_000}]}
    grammar = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "grammar": "root ::= x"}  # fmt: skip
    plan = [
        ("chat", "/v1/chat/completions", chat),
        ("embeddings", "/v1/embeddings", largest_embeddings()),
        ("7.5 MB chat", "/v1/chat/completions", huge),
        ("7.5 MB count_tokens", "/v1/messages/count_tokens", count_body),
        ("grammar", "/v1/chat/completions", grammar),
        ("hang-up", "/v1/chat/completions", chat),
    ]
    turn = secrets.randbelow(len(plan))
    while not stop.is_set():
        name, path, body = plan[turn % len(plan)]
        turn += 1
        if name in ("chat", "embeddings", "hang-up"):
            body = fresh(body)
        try:
            if name == "hang-up":
                async with asyncio.timeout(1.0):
                    await timed(client, url, key, path, body)
                status = 200
            else:
                _, status = await timed(client, url, key, path, body)
        except TimeoutError:
            status = 499
        statuses[f"{name} {status}"] += 1


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(seconds: float) -> None:
    with database() as dsn:
        await asyncio.to_thread(migrate.upgrade, dsn)
        keys = await make_users(dsn)
        with (
            backend(N_CTX, MAX_TOKENS_HARD_CAP=str(ANSWER)) as server,
            proxy_process(dsn, server.url, server.key) as url,
        ):
            timeout = aiohttp.ClientTimeout(total=900)
            async with aiohttp.ClientSession(timeout=timeout) as client:
                pid = await _backend_pid(client, server.url)
                chat = await largest_chat_body(client, url, keys["attacker"])
                tokens = await count(client, url, keys["attacker"], chat["messages"][0]["content"])
                services = {}
                for name, path, body in (
                    ("largest chat", "/v1/chat/completions", chat),
                    ("largest embeddings", "/v1/embeddings", largest_embeddings()),
                ):
                    times = []
                    for _ in range(2):
                        took, status = await timed(client, url, keys["attacker"], path, fresh(body))
                        assert status == 200, (name, status)
                        times.append(took)
                    services[name] = statistics.median(times)
                service = max(services.values())
                alone = await victim(client, url, keys["victim"], seconds / 2)
                stop, statuses = asyncio.Event(), Counter[str]()
                attackers = [
                    asyncio.create_task(
                        attacker(client, url, keys["attacker"], stop, chat, statuses)
                    )
                    for _ in range(4)
                ]
                await asyncio.sleep(2)  # the attacker's places are all taken
                attacked = await victim(client, url, keys["victim"], seconds)
                stop.set()
                await asyncio.gather(*attackers)
                pid_after = await _backend_pid(client, server.url)
    report(tokens, services, service, alone, attacked, statuses, pid, pid_after)


async def _backend_pid(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(f"{url}/health") as response:
        return int((await response.json())["pid"])


def report(
    tokens: int, services: dict[str, float], service: float, alone: list[float],
    attacked: list[float], statuses: Counter[str], pid: int, pid_after: int,
) -> None:  # fmt: skip
    print(
        f"SmolLM2-135M Q4_1 ({GGUF.name}), n_ctx {N_CTX}, MAX_TOKENS_HARD_CAP {ANSWER}; "
        "the attacker at its 4 concurrent places\n"
    )
    print(f"largest chat: {tokens} prompt tokens + {ANSWER} answer tokens")
    for name, took in services.items():
        print(f"service time alone, {name:<20} {took:6.2f} s")
    print(f"S (the longer)                          {service:6.2f} s\n")
    print(f"{'victim':<16} {'requests':>8} {'p50 s':>7} {'p99 s':>7}")
    for name, values in (("alone", alone), ("under attack", attacked)):
        print(f"{name:<16} {len(values):>8} {_p(values, 0.5):>7.2f} {_p(values, 0.99):>7.2f}")
    print("\nattacker's requests (kind, status): " + ", ".join(
        f"{k} x{v}" for k, v in sorted(statuses.items())
    ))  # fmt: skip
    added = _p(attacked, 0.99) - _p(alone, 0.99)
    print(f"\n{'figure':<44} {'measured':>10} {'target':>12}  met")
    rows = [
        ("victim p99 added under attack / S", f"{added / service:.2f}", "<= 2",
         added <= 2 * service),
        ("victim p50 under attack / alone", f"{_p(attacked, .5) / _p(alone, .5):.1f} x", "-", None),
        ("backend pid before / after", f"{pid} / {pid_after}", "same", pid == pid_after),
    ]  # fmt: skip
    for name, measured, target, met in rows:
        shown = "-" if met is None else ("yes" if met else "NO")
        print(f"{name:<44} {measured:>10} {target:>12}  {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="of the attack (alone: half)")
    args = parser.parse_args()
    asyncio.run(run(args.seconds))


if __name__ == "__main__":
    main()
