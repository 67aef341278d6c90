"""Groups: budgets over calendar periods in a time zone, exact across proxy processes, refused in
each API's shape, managed with the CLI and shown in `GET /v1/me` and `usage --group`."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest

from proxy.appkeys import ADMISSION
from proxy.auth.cache import Principal
from proxy.db.pool import Database, DatabaseBusy
from proxy.errors import BudgetReached, RequestTooLarge
from proxy.limits.budgets import Budgets
from tests.cli_helpers import failure, invoke, new_key, ok
from tests.dashboard_helpers import (
    client,
    make_admin_token,
    running_dashboard,
    sign_in,
    wait_for_rows,
)
from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import (
    BACKEND_KEY,
    bearer,
    eventually,
    make_user,
    proxy_environ,
    proxy_process,
    proxy_settings,
    running_proxy,
)
from tests.test_quotas import _row  # a finished request's row: 5 + 2 tokens
from tests.test_shared_slots import _at_least, _post, _until, held_backend, two_shared_proxies

NEW_YORK = ZoneInfo("America/New_York")
HI = [{"role": "user", "content": "Hi"}]


async def _sql(dsn: str, query: str, *args: Any) -> Any:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch(query, *args)
    finally:
        await con.close()


async def _group(dsn: str, name: str, members: list[str], tz: str = "UTC", **budgets: int) -> None:
    columns = ", ".join(["name", "time_zone", *budgets])
    values = ", ".join(f"${i}" for i in range(1, len(budgets) + 3))
    await _sql(
        dsn, f"INSERT INTO llama_groups ({columns}) VALUES ({values})", name, tz, *budgets.values()
    )
    for member in members:
        await _sql(
            dsn,
            """INSERT INTO llama_group_members (group_id, user_id)
               SELECT g.id, u.id FROM llama_groups g, users u
               WHERE g.name = $1 AND u.username = $2""",
            name,
            member,
        )


@pytest.fixture
async def database(db_dsn: str, tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(proxy_settings(db_dsn, 9, tmp_path))
    await db.open()
    yield db
    await db.close()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_a_weekly_budget_resets_at_the_week_start_of_the_groups_time_zone(
    db_dsn: str, database: Database
) -> None:
    alice_id, _ = await make_user(db_dsn, "alice")
    await _group(db_dsn, "night-shift", ["alice"], tz="America/New_York", tokens_per_week=10)
    alice = Principal(alice_id, "alice", "k", None, None)
    # Sunday 23:30 in New York: Monday 04:30 UTC, already the next ISO week in UTC.
    clock = Clock(datetime(2026, 12, 13, 23, 30, tzinfo=NEW_YORK))
    budgets = Budgets(database, clock=clock)
    await budgets.load()
    assert budgets.applies(alice)
    granted, headers = await budgets.reserve(alice, "r1", 7, 100)
    assert granted == 3  # the answer's room lowered to what the week has left
    assert headers["x-ratelimit-limit-tokens"] == "10"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == "30m0s"
    with pytest.raises(BudgetReached) as refused:
        await budgets.reserve(alice, "r2", 1, 1)
    assert "group 'night-shift' used 10 of its 10 tokens per week" in refused.value.message
    assert "resets at 2026-12-14T05:00:00+00:00" in refused.value.message  # Monday 00:00 there
    assert refused.value.headers["Retry-After"] == str(30 * 60)
    # Monday 00:00 UTC is Sunday evening in New York: still the same week there.
    clock.now = datetime(2026, 12, 14, 0, 0, 30, tzinfo=UTC)
    with pytest.raises(BudgetReached):
        await budgets.reserve(alice, "r3", 1, 1)
    clock.now = datetime(2026, 12, 14, 0, 0, 30, tzinfo=NEW_YORK)  # the week turned there
    granted, headers = await budgets.reserve(alice, "r4", 2, 3)
    assert (granted, headers["x-ratelimit-remaining-tokens"]) == (3, "5")
    # A prompt larger than the whole budget could never run: 400, not a wait.
    with pytest.raises(RequestTooLarge):
        await budgets.reserve(alice, "r5", 11, 0)
    spend = await _sql(db_dsn, "SELECT starts, tokens FROM llama_budget_spend")
    # Last week's row went when the new week was charged; this week's starts at 05:00 UTC.
    assert [(r["starts"], r["tokens"]) for r in spend] == [
        (datetime(2026, 12, 14, 5, 0, tzinfo=UTC), 5)
    ]


async def test_a_minute_budget_is_a_minute_long_when_the_zones_clocks_go_back(
    db_dsn: str, database: Database
) -> None:
    alice_id, _ = await make_user(db_dsn, "alice")
    await _group(db_dsn, "night-shift", ["alice"], tz="America/New_York", tokens_per_minute=10)
    alice = Principal(alice_id, "alice", "k", None, None)
    # 01:30:20 in New York on 1 November 2026, the first time round (EDT): 05:30:20 UTC. The
    # clocks go back at 02:00, so 01:30 comes again an hour later.
    clock = Clock(datetime(2026, 11, 1, 5, 30, 20, tzinfo=UTC))
    budgets = Budgets(database, clock=clock)
    await budgets.load()
    await budgets.reserve(alice, "r1", 5, 5)
    with pytest.raises(BudgetReached) as refused:
        await budgets.reserve(alice, "r2", 1, 1)
    assert "resets at 2026-11-01T05:31:00+00:00" in refused.value.message
    assert refused.value.headers["Retry-After"] == "40"  # not an hour and 40 s
    clock.now = datetime(2026, 11, 1, 5, 31, 5, tzinfo=UTC)
    granted, _ = await budgets.reserve(alice, "r3", 5, 5)
    assert granted == 5


async def test_settling_moves_a_charge_to_what_the_request_cost(
    db_dsn: str, database: Database
) -> None:
    alice_id, _ = await make_user(db_dsn, "alice")
    await _group(db_dsn, "team", ["alice"], tokens_per_day=100, tokens_per_month=1000)
    alice = Principal(alice_id, "alice", "k", None, None)
    budgets = Budgets(database)
    async with budgets.running():
        granted, _ = await budgets.reserve(alice, "r1", 10, 50)
        assert granted == 50
        rows = await _sql(db_dsn, "SELECT period, tokens FROM llama_budget_spend ORDER BY period")
        assert [(r["period"], r["tokens"]) for r in rows] == [("day", 60), ("month", 60)]
        budgets.observe(_row("r1", alice_id, datetime.now(UTC)))
        await eventually(lambda: not budgets._costs, 5)

        async def settled() -> bool:
            rows = await _sql(db_dsn, "SELECT tokens FROM llama_budget_spend")
            return {r["tokens"] for r in rows} == {7}

        for _ in range(50):
            if await settled():
                break
            await asyncio.sleep(0.1)
        assert await settled()
        assert await _sql(db_dsn, "SELECT * FROM llama_budget_holds") == []


class LateAnswers:
    """The pool's `run`, whose answer is lost after Postgres committed (a timeout just then)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self.lose = True

    async def run(self, work: Any) -> Any:
        answer = await self._database.run(work)
        if self.lose:
            raise DatabaseBusy("the answer came too late")
        return answer


async def test_a_charge_whose_answer_was_lost_is_settled_all_the_same(
    db_dsn: str, database: Database
) -> None:
    alice_id, _ = await make_user(db_dsn, "alice")
    await _group(db_dsn, "team", ["alice"], tokens_per_day=100)
    alice = Principal(alice_id, "alice", "k", None, None)
    late = LateAnswers(database)
    budgets = Budgets(late)  # type: ignore[arg-type]
    late.lose = False
    async with budgets.running():
        late.lose = True
        granted, _ = await budgets.reserve(alice, "r1", 10, 50)  # let through: Postgres is busy
        assert granted == 50
        late.lose = False
        # Postgres did charge it (10 + 50) though the proxy never heard so ...
        rows = await _sql(db_dsn, "SELECT tokens FROM llama_budget_spend")
        assert [r["tokens"] for r in rows] == [60]
        budgets.observe(_row("r1", alice_id, datetime.now(UTC)))

        async def settled() -> bool:  # ... and its row moves the charge to what it cost
            rows = await _sql(db_dsn, "SELECT tokens FROM llama_budget_spend")
            return [r["tokens"] for r in rows] == [7]

        for _ in range(50):
            if await settled():
                break
            await asyncio.sleep(0.1)
        assert await settled()


class FailsOnce:
    """The pool's `run`, whose next call fails with `fail` (then none)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self.fail: Exception | None = None

    async def run(self, work: Any) -> Any:
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        return await self._database.run(work)


async def test_settling_goes_on_after_a_round_fails(db_dsn: str, database: Database) -> None:
    """A settle Postgres refused once (a deadlock) is tried again, and so are later ones: the
    task that settles does not die with it."""
    alice_id, _ = await make_user(db_dsn, "alice")
    await _group(db_dsn, "team", ["alice"], tokens_per_day=100)
    alice = Principal(alice_id, "alice", "k", None, None)
    flaky = FailsOnce(database)
    budgets = Budgets(flaky)  # type: ignore[arg-type]

    async def spent() -> list[int]:
        return [r["tokens"] for r in await _sql(db_dsn, "SELECT tokens FROM llama_budget_spend")]

    async def until(tokens: list[int]) -> None:
        for _ in range(60):
            if await spent() == tokens:
                return
            await asyncio.sleep(0.1)
        assert await spent() == tokens

    async with budgets.running():
        await budgets.reserve(alice, "r1", 10, 50)
        assert await spent() == [60]
        flaky.fail = asyncpg.DeadlockDetectedError("deadlock detected")  # a settle fails ...
        budgets.observe(_row("r1", alice_id, datetime.now(UTC)))
        await until([7])  # ... and is settled all the same
        await budgets.reserve(alice, "r2", 10, 50)  # and settling goes on
        budgets.observe(_row("r2", alice_id, datetime.now(UTC)))
        await until([14])
        # A settle Postgres refuses for good is not tried for ever, holding up those after it:
        # that request keeps its reservation (60) and the next one is settled (7).
        await budgets.reserve(alice, "r3", 10, 50)
        flaky.fail = asyncpg.DataError("value out of range")
        budgets.observe(_row("r3", alice_id, datetime.now(UTC)))
        await asyncio.sleep(0.3)
        await budgets.reserve(alice, "r4", 10, 50)
        budgets.observe(_row("r4", alice_id, datetime.now(UTC)))
        await until([14 + 60 + 7])


async def test_a_group_budget_is_exact_across_two_proxy_processes(
    db_dsn: str, tmp_path: Path
) -> None:
    """20 requests at once through two processes, at a budget's edge: each costs 5 + 2 tokens
    and the budget is 50, so 7 run (49 tokens) and 13 are refused; never more."""
    upstream = FakeUpstream(expected_key=BACKEND_KEY)
    await upstream.start()
    try:
        _, alice = await make_user(db_dsn, "alice")
        _, bob = await make_user(db_dsn, "bob")
        await _group(db_dsn, "team", ["alice", "bob"], tokens_per_day=50)
        environ = proxy_environ(db_dsn, upstream.port, tmp_path, LLAMA_PROXY_MAX_CONCURRENT="100")
        with proxy_process(environ) as first, proxy_process(environ) as second:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
                for base in (first, second):  # keys verified in both first (a 400 spends nothing)
                    for key in (alice, bob):
                        url = f"{base}/v1/chat/completions"
                        async with client.post(url, data=b"{", headers=bearer(key)) as r:
                            assert r.status == 400

                async def call(base: str, key: str) -> tuple[int, dict[str, Any]]:
                    body = {"messages": HI, "max_tokens": 2}
                    url = f"{base}/v1/chat/completions"
                    async with client.post(url, json=body, headers=bearer(key)) as r:
                        return r.status, await r.json()

                results = await asyncio.gather(
                    *(
                        call(base, key)
                        for _ in range(5)
                        for base in (first, second)
                        for key in (alice, bob)
                    )
                )

                async def rows_landed() -> list[Any]:
                    return await _sql(
                        db_dsn,
                        """SELECT status_code, prompt_tokens, completion_tokens, error
                           FROM llama_requests WHERE path = '/v1/chat/completions'
                             AND status_code <> 400""",
                    )

                for _ in range(100):
                    rows = await rows_landed()
                    holds = await _sql(db_dsn, "SELECT * FROM llama_budget_holds")
                    if len(rows) == 20 and not holds:
                        break
                    await asyncio.sleep(0.1)
    finally:
        await upstream.stop()
    assert Counter(status for status, _ in results) == {200: 7, 429: 13}
    refusals = [body for status, body in results if status == 429]
    assert {b["error"]["code"] for b in refusals} == {"group_budget_exceeded"}
    assert all("group 'team'" in b["error"]["message"] for b in refusals)
    served = [r for r in rows if r["status_code"] == 200]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in served) == 49 <= 50
    assert Counter(r["error"] for r in rows if r["status_code"] == 429) == {
        "group_budget_exceeded": 13
    }
    spend = await _sql(db_dsn, "SELECT tokens FROM llama_budget_spend")
    assert [r["tokens"] for r in spend] == [49]  # settled: what the rows say, no hold left
    assert len(upstream.seen) == 7


async def test_refusals_in_each_apis_shape_and_members_added_while_running(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        key = await proxy.user("alice")
        outsider = await proxy.user("bob")
        groups = proxy.app[ADMISSION].budgets
        # The group is made while the proxy runs: NOTIFY tells it who is a member now.
        await _group(db_dsn, "class", ["alice"], tokens_per_month=10)
        user_id = (await _sql(db_dsn, "SELECT id FROM users WHERE username = 'alice'"))[0]["id"]
        await eventually(lambda: groups.applies(Principal(user_id, "alice", "k", None, None)))
        async with aiohttp.ClientSession() as client:

            async def post(path: str, body: dict[str, Any], who: str = key) -> Any:
                headers = {**bearer(who), "anthropic-version": "2023-06-01"}
                async with client.post(proxy.url(path), json=body, headers=headers) as r:
                    return r.status, await r.json(), r.headers

            status, _, headers = await post(
                "/v1/chat/completions", {"messages": HI, "max_tokens": 2}
            )
            assert status == 200  # 5 + 2 of 10: a prompt (5) and one answer token no longer fit
            assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) \
                == ("10", "3")  # fmt: skip
            await proxy.wait_for_records(1)
            status, openai, headers = await post(
                "/v1/chat/completions", {"messages": HI, "max_tokens": 2}
            )
            assert status == 429
            assert openai["error"]["type"] == "tokens"
            assert openai["error"]["code"] == "group_budget_exceeded"
            assert "group 'class' used 7 of its 10 tokens per month" in openai["error"]["message"]
            assert headers["x-ratelimit-limit-tokens"] == "10"
            assert headers["x-ratelimit-remaining-tokens"] == "0"
            assert int(headers["Retry-After"]) >= 1
            status, anthropic, _ = await post(
                "/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": HI}
            )
            assert status == 429
            assert anthropic["type"] == "error"
            assert anthropic["error"]["type"] == "rate_limit_error"
            assert "group 'class'" in anthropic["error"]["message"]
            status, rpc, _ = await post(
                "/rpc",
                {
                    "jsonrpc": "2.0",
                    "method": "create_message",
                    "params": {"message": "Hi"},
                    "id": 1,
                },
            )
            assert rpc["error"]["code"] == -32001
            assert "group 'class'" in rpc["error"]["message"]
            status, _, _ = await post(
                "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, outsider
            )
            assert status == 200  # not a member
            assert len(proxy.upstream.seen) == 2  # alice's first request and bob's
            async with client.get(proxy.url("/v1/me"), headers=bearer(key)) as r:
                me = await r.json()
    [group] = me["groups"]
    assert group["name"] == "class"
    assert group["time_zone"] == "UTC"
    [budget] = group["budgets"]
    assert (budget["period"], budget["budget"], budget["used"]) == ("month", 10, 7)
    assert budget["resets_at"].endswith("+00:00")


def test_groups_with_the_cli(cli_env: dict[str, str]) -> None:
    new_key(cli_env, "alice")
    new_key(cli_env, "bob")
    out = ok(cli_env, "create-group", "--name", "Research", "--time-zone", "Europe/Berlin",
             "--tokens-per-day", "1000")  # fmt: skip
    assert "group 'research' (Europe/Berlin): 1000 tokens per day" in out
    assert "already exists" in failure(cli_env, "create-group", "--name", "research")
    assert (
        "not a time zone"
        in invoke(cli_env, "create-group", "--name", "x", "--time-zone", "Mars/Olympus").output
    )
    assert "now a member" in ok(
        cli_env, "add-to-group", "--group", "research", "--username", "alice"
    )
    assert "already" in ok(cli_env, "add-to-group", "--group", "research", "--username", "alice")
    ok(cli_env, "add-to-group", "--group", "research", "--username", "bob")
    assert "no user named 'carol'" in failure(
        cli_env, "add-to-group", "--group", "research", "--username", "carol"
    )
    out = ok(cli_env, "set-limit", "--group", "research", "--tokens-per-week", "5000",
             "--tokens-per-day", "none")  # fmt: skip
    assert "5000 tokens per week" in out
    assert "per day" not in out
    assert (
        "a group has --rate-limit, --window, --max-concurrent, token budgets"
        in invoke(cli_env, "set-limit", "--group", "research", "--max-tokens", "5").output
    )
    assert (
        "is a group's or a key's budget"
        in invoke(cli_env, "set-limit", "--username", "alice", "--tokens-per-month", "5").output
    )
    listed = json.loads(ok(cli_env, "list-groups", "--json"))
    assert [(g["name"], g["members"], g["tokens_per_week"], g["used_week"]) for g in listed] == [
        ("research", ["alice", "bob"], 5000, 0)
    ]
    table = ok(cli_env, "list-groups")
    assert "alice,bob" in table
    assert "0/5000" in table
    usage = json.loads(ok(cli_env, "usage", "--group", "research", "--json"))
    assert usage[0]["budgets"][0]["period"] == "week"
    assert "no longer a member" in ok(
        cli_env, "remove-from-group", "--group", "research", "--username", "bob"
    )
    assert "Deleted group research" in ok(cli_env, "delete-group", "--name", "research", "--yes")
    assert ok(cli_env, "list-groups").strip() == "(none)"


async def test_the_dashboards_groups_page_shows_members_budgets_and_tokens_per_day(
    db_dsn: str, tmp_path: Path
) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    await make_user(db_dsn, "bob")
    await _group(db_dsn, "research", ["alice", "bob"], tz="Europe/Berlin", tokens_per_week=500)
    await _group(db_dsn, "idle", [])
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        url = dashboard.proxy.url("/v1/chat/completions")
        async with http.post(url, json={"messages": HI}, headers=bearer(alice)) as r:
            assert r.status == 200
        await wait_for_rows(db_dsn, 1)
        for _ in range(50):  # the charge is settled just after the row is made
            if not await _sql(db_dsn, "SELECT 1 FROM llama_budget_holds"):
                break
            await asyncio.sleep(0.1)
        await sign_in(http, dashboard, token)
        async with http.get(dashboard.at("/groups")) as r:
            assert r.status == 200
            page = await r.text()
    assert 'id="group-research"' in page
    assert "Europe/Berlin" in page
    assert "alice, bob" in page
    assert re.search(r'class="budget-week">7 of 500 tokens', page), page
    data = json.loads(re.search(r'id="groups-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]
    [research] = data["groups"]  # "idle" has no rows
    assert research["name"] == "research"
    assert research["tokens"][-1] == 7
    assert len(data["days"]) == 30


async def test_a_groups_request_limit_and_cap_on_requests_at_once_hold_for_its_members(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path) as proxy:
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        carol = await proxy.user("carol")
        await _group(db_dsn, "pair", ["alice", "bob"])
        await _sql(
            db_dsn,
            "UPDATE llama_groups SET rate_limit = 3, rate_window_seconds = 60, max_concurrent = 1",
        )
        budgets = proxy.app[ADMISSION].budgets
        user_id = (await _sql(db_dsn, "SELECT id FROM users WHERE username = 'bob'"))[0]["id"]
        bob_principal = Principal(user_id, "bob", "k", None, None)
        await eventually(lambda: bool(budgets.group_limits(bob_principal)))
        proxy.upstream.pieces = ["one", " two", " three", " four"]
        proxy.upstream.gate, proxy.upstream.gate_after = asyncio.Event(), 3  # stalls after " two"
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            held = await client.post(
                url, json={"messages": HI, "stream": True}, headers=bearer(alice)
            )
            assert held.status == 200  # alice's request runs, held open
            received = b""
            while b" two" not in received:
                chunk = await asyncio.wait_for(held.content.readany(), 5)
                assert chunk, received  # the stream must still be open
                received += chunk
            bobs = client.post(url, json={"messages": HI}, headers=bearer(bob))
            async with await asyncio.wait_for(bobs, 10) as r:  # refused, not queued
                at_once = r.status, await r.json()
            waiting = asyncio.create_task(  # not in the group: waits for the backend's slot
                client.post(url, json={"messages": HI}, headers=bearer(carol))
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()
            proxy.upstream.gate.set()
            await held.read()
            held.release()
            async with await waiting as r:
                assert r.status == 200
            statuses = []
            for key in (bob, alice, bob):
                async with client.post(url, json={"messages": HI}, headers=bearer(key)) as r:
                    statuses.append((r.status, await r.json(), r.headers))
    assert at_once[0] == 429
    assert "at most 1 of the requests of group 'pair'" in at_once[1]["error"]["message"]
    # The group's 3 requests per minute: alice's held one, then bob and alice; bob's next is one
    # too many (his own limit is the proxy's default, far higher).
    assert [s for s, _, _ in statuses] == [200, 200, 429]
    _, refused, headers = statuses[2]
    assert (
        "Rate limit of group 'pair' reached: at most 3 requests per 60 s"
        in refused["error"]["message"]
    )
    assert int(headers["Retry-After"]) >= 1


async def test_shared_slots_go_round_groups_first_across_processes(
    db_dsn: str, tmp_path: Path
) -> None:
    """Through two processes sharing one slot: u1..u3 are one group, u4 another. Once u1's
    running request ends, u4 goes first (its group was never served), then a user of the big
    group, then u4 again; by users alone u2 and u3 would both go before u4."""
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend, LLAMA_PROXY_MAX_CONCURRENT="10") as (
            first,
            second,
        ),
    ):
        keys = {name: await first.user(name) for name in ("u1", "u2", "u3", "u4")}
        await _group(db_dsn, "big", ["u1", "u2", "u3"])
        await _group(db_dsn, "small", ["u4"])
        async with aiohttp.ClientSession() as client:
            running = asyncio.create_task(_post(client, first.url(""), keys["u1"], "u1"))
            await backend.arrivals(1)
            posts = [running]
            for name, via in (("u2", first), ("u3", first), ("u4", second)) * 2:
                posts.append(asyncio.create_task(_post(client, via.url(""), keys[name], name)))
                await asyncio.sleep(0.05)  # in this order
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 6))
            for _ in range(7):
                backend.let_one_go()
            assert await asyncio.gather(*posts) == [200] * 7
    assert backend.arrived[:4] == ["u1", "u4", "u2", "u4"]
    assert sorted(backend.arrived[4:]) == ["u2", "u3", "u3"]
    assert backend.most == 1


async def test_a_groups_cap_on_requests_at_once_holds_across_processes(
    db_dsn: str, tmp_path: Path
) -> None:
    async with (
        held_backend() as backend,
        two_shared_proxies(db_dsn, tmp_path, backend) as (first, second),
    ):
        alice, bob = await first.user("alice"), await first.user("bob")
        carol = await first.user("carol")
        await _group(db_dsn, "pair", ["alice", "bob"])
        await _sql(db_dsn, "UPDATE llama_groups SET max_concurrent = 1")
        bob_id = (await _sql(db_dsn, "SELECT id FROM users WHERE username = 'bob'"))[0]["id"]
        bob_principal = Principal(bob_id, "bob", "k", None, None)
        for proxy in (first, second):
            budgets = proxy.app[ADMISSION].budgets
            await eventually(lambda b=budgets: bool(b.group_caps(bob_principal)))  # type: ignore[misc]
        async with aiohttp.ClientSession() as client:
            running = asyncio.create_task(_post(client, first.url(""), alice, "alice"))
            await backend.arrivals(1)
            # Through the other process, whose own count of the group's requests is 0.
            body = {"messages": HI, "max_tokens": 1}
            url = second.url("/v1/chat/completions")
            async with client.post(url, json=body, headers=bearer(bob)) as r:
                refused = r.status, await r.json()
            queued = asyncio.create_task(_post(client, second.url(""), carol, "carol"))
            await _until(lambda: _at_least(db_dsn, "SELECT count(*) FROM llama_slot_waiters", 1))
            for _ in range(2):
                backend.let_one_go()
            assert await running == 200
            assert await queued == 200  # not in the group: it only waited for the slot
    assert refused[0] == 429
    assert "at most 1 of the requests of group 'pair'" in refused[1]["error"]["message"]
    assert backend.arrived == ["alice", "carol"]
