"""Token quotas: counted from llama_requests plus this process's own finished requests,
refused with OpenAI's 429 `tokens` shape, and reset as the minute slides and the UTC day turns."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.audit.row import AuditRow
from proxy.auth.cache import Principal
from proxy.db.pool import Database
from proxy.errors import RequestTooLarge, TokenQuotaExceeded
from proxy.limits.quotas import Reserved, TokenQuotas
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
    assert await TokenQuotas(unopened).reserve(_alice(1), "r1", 500, 1000) == Reserved({}, 1000)


async def test_the_minute_quota_refuses_then_frees_up_as_the_window_slides(
    db_dsn: str, database: Database
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    await _used(db_dsn, user_id, 10, clock.now - timedelta(seconds=30))
    quotas = TokenQuotas(database, clock=clock)
    with pytest.raises(TokenQuotaExceeded) as refused:
        await quotas.reserve(_alice(user_id, per_minute=10), "r1", 0, 0)
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert "used 10 of your 10 tokens per minute" in error.message
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 29 <= int(error.headers["Retry-After"]) <= 30
    clock.now += timedelta(seconds=31)  # the tokens used 30 s ago are out of the window
    headers = (await quotas.reserve(_alice(user_id, per_minute=10), "r2", 0, 0)).headers
    assert headers["x-ratelimit-limit-tokens"] == "10"
    assert headers["x-ratelimit-remaining-tokens"] == "10"


async def test_the_day_quota_resets_at_utc_midnight(db_dsn: str, database: Database) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    await _used(db_dsn, user_id, 100, clock.now)
    quotas = TokenQuotas(database, clock=clock)
    with pytest.raises(TokenQuotaExceeded) as refused:
        await quotas.reserve(_alice(user_id, per_day=100, per_minute=1000), "r1", 0, 0)
    midnight = (clock.now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert "tokens per day" in refused.value.message
    retry_after = int(refused.value.headers["Retry-After"])
    assert abs(retry_after - (midnight - clock.now).total_seconds()) <= 1
    clock.now = midnight + timedelta(seconds=90)  # past the minute window too
    headers = (await quotas.reserve(_alice(user_id, 100, 1000), "r2", 0, 0)).headers
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

    async def remaining() -> str:
        reserved = await quotas.reserve(alice, f"check-{next(checks)}", 0, 0)
        return reserved.headers["x-ratelimit-remaining-tokens"]

    def finished(request_id: str) -> None:
        quotas.observe(_row(request_id, user_id, clock.now, client_request_id="same-for-all"))

    checks = itertools.count()
    assert await remaining() == "20"
    finished("r1")  # not in the database yet: the audit writer batches rows
    assert await remaining() == "13"
    await _used(db_dsn, user_id, 7, clock.now, request_id="r1")  # now it is
    assert await remaining() == "13"
    finished("r2")
    assert await remaining() == "6"
    finished("r3")
    with pytest.raises(TokenQuotaExceeded):
        await remaining()


async def test_what_a_request_may_cost_is_reserved_until_its_row_is_counted(
    db_dsn: str, database: Database
) -> None:
    user_id, _ = await make_user(db_dsn, "alice")
    clock = Clock()
    quotas = TokenQuotas(database, cache_seconds=0, clock=clock)
    alice = _alice(user_id, per_minute=300)
    # A 100-token prompt asking up to 150 answer tokens: all of it fits, and is held.
    first = await quotas.reserve(alice, "r1", 100, 150)
    assert (first.answer, first.headers["x-ratelimit-remaining-tokens"]) == (150, "50")
    # The next one's answer is lowered to what is left (40 of 50, after its 10-token prompt)...
    second = await quotas.reserve(alice, "r2", 10, 150)
    assert (second.answer, second.headers["x-ratelimit-remaining-tokens"]) == (40, "0")
    # ... and a third, running at the same time, cannot get in at all.
    with pytest.raises(TokenQuotaExceeded):
        await quotas.reserve(alice, "r3", 1, 10)
    # r1 ends having used 100 + 20: its unused reservation comes back at once.
    quotas.observe(_row("r1", user_id, clock.now)._replace(prompt_tokens=100, completion_tokens=20))
    third = await quotas.reserve(alice, "r3", 1, 10)
    assert (third.answer, third.headers["x-ratelimit-remaining-tokens"]) == (10, "119")
    # A tool loop asking again reserves its next prompt too, or is refused.
    quotas.extend(alice, "r3", 100)
    with pytest.raises(TokenQuotaExceeded):
        quotas.extend(alice, "r3", 100)
    # A prompt larger than the quota itself can never pass: a 400, not a 429 to retry.
    with pytest.raises(RequestTooLarge) as never:
        await quotas.reserve(alice, "r4", 300, 10)
    assert never.value.status == 400
    assert "more than your quota of 300 tokens per minute allows at all" in never.value.message


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
                answers.append(await chat(client, url, alice, "alice", max_tokens=2))
                await proxy.wait_for_records(count)
            unlimited = await chat(client, url, bob, "bob")
    (s1, _, h1), (s2, _, h2), (s3, error, h3) = answers
    assert (s1, s2, s3) == (200, 200, 429)
    # What is left once the request's answer (up to 2 tokens) is reserved.
    assert (h1["x-ratelimit-limit-tokens"], h1["x-ratelimit-remaining-tokens"]) == ("10", "8")
    assert h2["x-ratelimit-remaining-tokens"] == "1"
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
        # Each answer costs 5 + 2: a third request's prompt (5) and one token find 0 left.
        await set_limits(db_dsn, "alice", tokens_per_minute=14)
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
    assert len(proxy.upstream.seen) == 1  # the refused request never reached the model
    assert len(proxy.upstream.measured) == 2  # its prompt was measured before its turn
    assert [row.status_code for row in rows] == [499, 429]
