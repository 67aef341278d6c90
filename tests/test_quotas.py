"""Token quotas: counted from llama_requests plus this process's own finished requests,
refused with OpenAI's 429 `tokens` shape, and reset as the minute slides and the UTC day turns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.audit.row import AuditRow
from proxy.auth.cache import Principal
from proxy.db.pool import Database
from proxy.errors import TokenQuotaExceeded
from proxy.limits.quotas import TokenQuotas
from tests.proxy_harness import bearer, make_user, proxy_settings, running_proxy
from tests.sharing_helpers import chat, set_limits
from tests.timed_upstream import TimedUpstream


@pytest.fixture
async def database(db_dsn: str, tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(proxy_settings(db_dsn, 9, tmp_path))
    await db.open()
    yield db
    await db.close()


async def _used(
    dsn: str, user_id: int, tokens: int, at: datetime, request_id: str | None = None
) -> None:
    """A llama_requests row, as the audit writer of any proxy process would write it."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            """INSERT INTO llama_requests (request_id, created_at, user_id, username, path,
                   status_code, duration_ms, prompt_tokens, completion_tokens)
               VALUES ($1, $2, $3, 'alice', '/v1/chat/completions', 200, 10, $4, $5)""",
            request_id,
            at,
            user_id,
            tokens // 2,
            tokens - tokens // 2,
        )
    finally:
        await con.close()


def _alice(user_id: int, per_day: int | None = None, per_minute: int | None = None) -> Principal:
    return Principal(user_id, "alice", "k", None, None, None, None, per_day, per_minute)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_users_without_a_quota_cost_nothing(db_dsn: str, tmp_path: Path) -> None:
    unopened = Database(proxy_settings(db_dsn, 9, tmp_path))  # any query would raise
    assert await TokenQuotas(unopened).admit(_alice(1)) == {}


async def test_the_minute_quota_refuses_then_frees_up_as_the_window_slides(
    db_dsn: str, database: Database
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    await _used(db_dsn, user_id, 10, clock.now - timedelta(seconds=30))
    quotas = TokenQuotas(database, clock=clock)
    with pytest.raises(TokenQuotaExceeded) as refused:
        await quotas.admit(_alice(user_id, per_minute=10))
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert "used 10 of your 10 tokens per minute" in error.message
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 29 <= int(error.headers["Retry-After"]) <= 30
    clock.now += timedelta(seconds=31)  # the tokens used 30 s ago are out of the window
    headers = await quotas.admit(_alice(user_id, per_minute=10))
    assert headers["x-ratelimit-limit-tokens"] == "10"
    assert headers["x-ratelimit-remaining-tokens"] == "10"


async def test_the_day_quota_resets_at_utc_midnight(db_dsn: str, database: Database) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    await _used(db_dsn, user_id, 100, clock.now)
    quotas = TokenQuotas(database, clock=clock)
    with pytest.raises(TokenQuotaExceeded) as refused:
        await quotas.admit(_alice(user_id, per_day=100, per_minute=1000))
    midnight = (clock.now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert "tokens per day" in refused.value.message
    retry_after = int(refused.value.headers["Retry-After"])
    assert abs(retry_after - (midnight - clock.now).total_seconds()) <= 1
    clock.now = midnight + timedelta(seconds=90)  # past the minute window too
    headers = await quotas.admit(_alice(user_id, per_day=100, per_minute=1000))
    # The headers describe the quota with fewer tokens left: the day's, whole again.
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "100"
    assert headers["x-ratelimit-reset-tokens"] == "0ms"


async def test_own_finished_requests_count_at_once_and_only_once_when_their_rows_land(
    db_dsn: str, database: Database
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    quotas = TokenQuotas(database, cache_seconds=0, clock=clock)
    alice = _alice(user_id, per_minute=20)
    assert (await quotas.admit(alice))["x-ratelimit-remaining-tokens"] == "20"

    def finished(request_id: str) -> None:
        quotas.observe(_row(request_id, user_id, clock.now, client_request_id="same-for-all"))

    finished("r1")  # not in the database yet: the audit writer batches rows
    assert (await quotas.admit(alice))["x-ratelimit-remaining-tokens"] == "13"
    await _used(db_dsn, user_id, 7, clock.now, request_id="r1")  # now it is
    assert (await quotas.admit(alice))["x-ratelimit-remaining-tokens"] == "13"
    finished("r2")
    assert (await quotas.admit(alice))["x-ratelimit-remaining-tokens"] == "6"
    finished("r3")
    with pytest.raises(TokenQuotaExceeded):
        await quotas.admit(alice)


def _row(request_id: str, user_id: int, at: datetime, **extra: str) -> AuditRow:
    """A finished request's row: 5 prompt and 2 completion tokens."""
    return AuditRow(
        request_id, at, user_id, "alice", None, "POST", "/v1/chat/completions", None, False,
        200, 1.0, None, None, 0, 0, 5, 2, None, None, **extra,
    )  # fmt: skip


async def test_over_quota_through_the_proxy_is_429_tokens_with_openai_headers(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.0)  # each answer reports 5 + 2 tokens
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:  # type: ignore[arg-type]
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        await set_limits(db_dsn, "alice", tokens_per_minute=10)
        url = proxy.url("/v1/chat/completions")
        answers = []
        async with aiohttp.ClientSession() as client:
            for count in (1, 2, 3):
                answers.append(await chat(client, url, alice, "alice"))
                await proxy.wait_for_records(count)
            unlimited = await chat(client, url, bob, "bob")
    (s1, _, h1), (s2, _, h2), (s3, error, h3) = answers
    assert (s1, s2, s3) == (200, 200, 429)
    assert (h1["x-ratelimit-limit-tokens"], h1["x-ratelimit-remaining-tokens"]) == ("10", "10")
    assert h2["x-ratelimit-remaining-tokens"] == "3"
    assert h2["x-ratelimit-reset-tokens"].endswith("s")  # when the first answer's tokens leave
    assert error["error"]["type"] == "tokens"
    assert error["error"]["code"] == "rate_limit_exceeded"
    assert "14 of your 10 tokens per minute" in error["error"]["message"]
    assert h3["x-ratelimit-remaining-tokens"] == "0"
    assert int(h3["Retry-After"]) >= 1
    assert "x-ratelimit-limit-requests" in h1  # the request limit's headers are still there
    assert unlimited[0] == 200
    assert "x-ratelimit-limit-tokens" not in unlimited[2]
    assert upstream.received == ["alice", "alice", "bob"]


async def test_tokens_used_through_other_proxies_count(db_dsn: str, tmp_path: Path) -> None:
    upstream = TimedUpstream(service_time=0.0)
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:  # type: ignore[arg-type]
        alice = await proxy.user("alice")
        await set_limits(db_dsn, "alice", tokens_per_day=1000)
        con = await asyncpg.connect(db_dsn)
        user_id = await con.fetchval("SELECT id FROM users WHERE username = 'alice'")
        await con.close()
        await _used(db_dsn, user_id, 1200, datetime.now(UTC))
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            status, error, _ = await chat(client, url, alice, "alice")
    assert status == 429
    assert "1200 of your 1000 tokens per day" in error["error"]["message"]
    assert upstream.received == []


async def test_streamed_answers_count_against_the_quota(db_dsn: str, tmp_path: Path) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:  # FakeUpstream: 5 + 2 tokens, streamed
        alice = await proxy.user("alice")
        await set_limits(db_dsn, "alice", tokens_per_minute=10)
        url = proxy.url("/v1/chat/completions")
        answers = []
        async with aiohttp.ClientSession() as client:
            for count in (1, 2, 3):
                answers.append(await chat(client, url, alice, "alice", stream=True))
                await proxy.wait_for_records(count)
    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert answers[0][1]["stream"].endswith("data: [DONE]\r\n\r\n")
    assert '"usage"' not in answers[0][1]["stream"]  # asked for by the proxy, not the client
    assert [(r.prompt_tokens, r.completion_tokens) for r in proxy.records[:2]] == [(5, 2)] * 2


@pytest.mark.parametrize("stream", [True, False])
async def test_hanging_up_early_never_evades_the_quota(
    db_dsn: str, tmp_path: Path, stream: bool
) -> None:
    """The tokens generated before a client left are charged, so its next request is refused:
    the prompt alone (5) would leave a quota of 6 unspent, the prompt and 2 answer tokens not."""
    async with running_proxy(db_dsn, tmp_path) as proxy:
        alice = await proxy.user("alice")
        await set_limits(db_dsn, "alice", tokens_per_day=6)
        proxy.upstream.pieces = ["one", " two", " three", " four"]
        proxy.upstream.gate, proxy.upstream.gate_after = asyncio.Event(), 3  # stalls after " two"
        url = proxy.url("/v1/chat/completions")
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        async with aiohttp.ClientSession() as client:
            if stream:
                r = await client.post(url, json=body, headers=bearer(alice))
                received = b""
                while b" two" not in received:
                    received += await asyncio.wait_for(r.content.readany(), 5)
                r.close()
            else:
                waiting = asyncio.create_task(client.post(url, json=body, headers=bearer(alice)))
                await asyncio.sleep(0.5)  # " two" has been generated: the backend is at the gate
                waiting.cancel()
            await asyncio.wait_for(proxy.upstream.client_left.wait(), 5)
            proxy.upstream.gate.set()  # a next request let through is answered, not held
            (left,) = await proxy.wait_for_records(1)
            status, error, headers = await chat(client, url, alice, "alice")
        rows = await proxy.wait_for_records(2)
    assert (left.status_code, left.prompt_tokens, left.completion_tokens) == (499, 5, 2)
    assert status == 429, error
    assert error["error"]["type"] == "tokens"
    assert "used 7 of your 6 tokens per day" in error["error"]["message"]
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(proxy.upstream.seen) == 1  # the refused request never reached the backend
    assert [row.status_code for row in rows] == [499, 429]
