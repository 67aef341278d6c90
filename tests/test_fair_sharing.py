"""Fair sharing of one single-slot backend through the real proxy: turns, caps, timeouts.

The backend is a real HTTP server that takes a fixed time per request (`TimedUpstream`), so
the order in which it served users is the order the proxy let them in.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from proxy.appkeys import BACKENDS
from tests.proxy_harness import running_proxy
from tests.sharing_helpers import chat, set_limits, until
from tests.timed_upstream import TimedUpstream

SERVICE = 0.1  # seconds per request at the fake backend


async def test_one_request_waits_for_at_most_one_request_of_a_user_with_twenty_queued(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=SERVICE)
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:  # type: ignore[arg-type]
        heavy, light = await proxy.user("heavy"), await proxy.user("light")
        await set_limits(db_dsn, "heavy", max_concurrent=20)
        backends, url = proxy.app[BACKENDS], proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            # Keys verified and users idle again, so only the queue decides below.
            assert (await chat(client, url, heavy, "warm-up"))[0] == 200
            assert (await chat(client, url, light, "warm-up"))[0] == 200
            flood = [asyncio.create_task(chat(client, url, heavy, "heavy")) for _ in range(20)]
            await until(lambda: backends.queued() == 19 and backends.in_flight("default") == 1)
            status, _, _ = await chat(client, url, light, "light")
            results = await asyncio.gather(*flood)
        records = await proxy.wait_for_records(23)
    assert status == 200
    assert [r[0] for r in results] == [200] * 20
    light_record = [r for r in records if r.username == "light"][-1]
    assert light_record.queue_ms is not None
    # It waited for the heavy request running when it was queued and for nothing else.
    assert light_record.queue_ms < SERVICE * 1000 + 100  # one service time, plus scheduling
    (served,) = [s for s in upstream.served if s.user == "light"]
    queued_at = served.started - light_record.queue_ms / 1000
    overtook = [s for s in upstream.served if s.user == "heavy" and queued_at < s.started]
    assert all(s.started > served.started for s in overtook)
    order = [user for user in upstream.users() if user != "warm-up"]
    assert order.index("light") <= 2, order  # among the first, not after the twenty
    heavy_waits = sorted(r.queue_ms or 0.0 for r in records if r.username == "heavy")
    assert heavy_waits[-1] > 19 * SERVICE * 1000  # the last heavy one did wait for the rest
    assert upstream.most_active == 1  # the single slot was never exceeded


async def test_the_concurrency_cap_counts_queued_and_in_flight_per_user(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.01, gate=asyncio.Event())
    settings = {"LLAMA_PROXY_MAX_CONCURRENT": "2"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        await set_limits(db_dsn, "bob", max_concurrent=1)
        backends, url = proxy.app[BACKENDS], proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            held = [asyncio.create_task(chat(client, url, alice, "alice")) for _ in range(2)]
            held.append(asyncio.create_task(chat(client, url, bob, "bob")))
            await until(lambda: backends.in_flight("default") + backends.queued() == 3)
            alice_status, alice_error, alice_headers = await chat(client, url, alice, "alice")
            bob_status, bob_error, _ = await chat(client, url, bob, "bob")
            upstream.gate.set()  # type: ignore[union-attr]
            statuses = [r[0] for r in await asyncio.gather(*held)]
            after = await chat(client, url, alice, "alice")  # room again once they finished
    assert statuses == [200, 200, 200]
    assert after[0] == 200
    assert (alice_status, bob_status) == (429, 429)
    assert alice_error["error"]["code"] == "rate_limit_exceeded"
    assert alice_error["error"]["type"] == "requests"
    assert "at most 2 of your requests" in alice_error["error"]["message"]
    assert "at most 1 of your requests" in bob_error["error"]["message"]
    assert alice_headers["Retry-After"] == "1"
    assert upstream.received.count("alice") == 3
    assert upstream.received.count("bob") == 1


async def test_a_request_that_waits_past_the_queue_timeout_gets_503_and_retry_after(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.01, gate=asyncio.Event())
    settings = {"LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS": "1"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            first = asyncio.create_task(chat(client, url, alice, "alice"))
            await upstream.arrived.wait()
            status, error, headers = await chat(client, url, bob, "bob")
            assert proxy.app[BACKENDS].queued() == 0
            upstream.gate.set()  # type: ignore[union-attr]
            assert (await first)[0] == 200
        records = await proxy.wait_for_records(2)
    assert status == 503
    assert error["error"]["code"] == "queue_timeout"
    assert "waited 1 s" in error["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    (bob_record,) = [r for r in records if r.username == "bob"]
    assert bob_record.status_code == 503
    assert bob_record.queue_ms is not None
    assert 1000 <= bob_record.queue_ms < 1500
    assert upstream.received == ["alice"]


async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.01, gate=asyncio.Event())
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        backends, url = proxy.app[BACKENDS], proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            first = asyncio.create_task(chat(client, url, alice, "alice"))
            await upstream.arrived.wait()
            leaving = asyncio.create_task(chat(client, url, bob, "bob"))
            await until(lambda: backends.queued() == 1)
            leaving.cancel()  # the client hangs up while waiting for its turn
            await until(lambda: backends.queued() == 0, timeout=1.0)
            records = await proxy.wait_for_records(1)
            upstream.gate.set()  # type: ignore[union-attr]
            assert (await first)[0] == 200
    assert [(r.username, r.status_code) for r in records[:1]] == [("bob", 499)]
    assert upstream.received == ["alice"]  # bob's request never reached the backend


async def test_max_tokens_is_capped_by_the_users_own_cap_within_the_global_one(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.0)
    settings = {"MAX_TOKENS_HARD_CAP": "300"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        carol = await proxy.user("carol")
        await set_limits(db_dsn, "bob", max_tokens=100)
        await set_limits(db_dsn, "carol", max_tokens=1000)  # the global cap bounds overrides too
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            for key, user in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
                for asked in (None, 50, 500, 800):
                    fields = {} if asked is None else {"max_tokens": asked}
                    assert (await chat(client, url, key, user, **fields))[0] == 200
                # A string, a float or a boolean is no whole number (llama_cpp.server would
                # coerce it), and 0 or less is no answer at all (llama_cpp.server would read
                # "until the context is full"): refused, naming the field, spending nothing.
                for wrong in ("100000", 1e5, True, 0, -5):
                    status, body, _ = await chat(client, url, key, user, max_tokens=wrong)
                    assert (status, body["error"]["param"]) == (400, "max_tokens")
    sent = [(s.user, s.body["max_tokens"]) for s in upstream.served]
    assert sent == [
        *[("alice", n) for n in (300, 50, 300, 300)],
        *[("bob", n) for n in (100, 50, 100, 100)],
        *[("carol", n) for n in (300, 50, 300, 300)],
    ]


async def test_max_completion_tokens_is_capped_like_max_tokens(db_dsn: str, tmp_path: Path) -> None:
    """OpenAI's newer name for the answer's length, which llama_cpp.server ignores: whichever
    the client sends is capped, and the backend gets it as max_tokens."""
    upstream = TimedUpstream(service_time=0.0)
    settings = {"MAX_TOKENS_HARD_CAP": "300"}
    async with running_proxy(db_dsn, tmp_path, upstream, **settings) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        await set_limits(db_dsn, "bob", max_tokens=100)
        url = proxy.url("/v1/chat/completions")
        asked: list[dict[str, int]] = [
            {"max_completion_tokens": 50},
            {"max_completion_tokens": 5000},
            {"max_tokens": 80, "max_completion_tokens": 5000},
        ]
        async with aiohttp.ClientSession() as client:
            for key, user in ((alice, "alice"), (bob, "bob")):
                for fields in asked:
                    assert (await chat(client, url, key, user, **fields))[0] == 200
    sent = [
        (s.user, s.body["max_tokens"], "max_completion_tokens" in s.body) for s in upstream.served
    ]
    assert sent == [
        ("alice", 50, False), ("alice", 300, False), ("alice", 80, False),
        ("bob", 50, False), ("bob", 100, False), ("bob", 80, False),
    ]  # fmt: skip
