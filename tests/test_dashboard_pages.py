"""What the Overview, Live and Requests pages show, from requests the tests make or write."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.appkeys import PRESENCE
from proxy.dashboard.live import snapshot
from tests.dashboard_helpers import (
    Dashboard,
    client,
    make_admin_token,
    running_dashboard,
    sign_in,
    wait_for_rows,
)
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, bearer, make_user, random_key, running_proxy

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
_DATA_RE = re.compile(r'<script type="application/json" id="overview-data">(.*?)</script>', re.S)


async def _overview(
    http: aiohttp.ClientSession, dashboard: Dashboard
) -> tuple[dict[str, Any], str]:
    async with http.get(dashboard.at("/")) as r:
        assert r.status == 200
        page = await r.text()
    match = _DATA_RE.search(page)
    assert match
    return json.loads(match.group(1)), page


def _user(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(u for u in data["stacked"] if u["name"] == name)


async def test_overview_counts_the_requests_made(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        for key in (alice, alice, alice, bob, random_key()):
            async with http.post(
                dashboard.proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)
            ) as r:
                await r.read()
        con = await asyncpg.connect(db_dsn)
        try:  # Older rows: 10 days ago shows, 40 days ago is out of the 30-day range.
            await con.execute(
                """INSERT INTO llama_requests (username, path, status_code, duration_ms, ttfb_ms,
                                               prompt_tokens, completion_tokens, created_at)
                   VALUES ('bob', '/v1/chat/completions', 502, 400, NULL, 0, 0,
                           now() - interval '10 days'),
                          ('bob', '/v1/chat/completions', 200, 100, 50, 9, 9,
                           now() - interval '40 days')"""
            )
        finally:
            await con.close()
        await wait_for_rows(db_dsn, 6)
        assert [row["requests"] for row in await dashboard.proxy.strangers()] == [1]  # the 401
        await sign_in(http, dashboard, token)
        data, page = await _overview(http, dashboard)

    assert len(data["days"]) == 30
    assert data["days"][-1] == datetime.now(UTC).date().isoformat()
    ten_days_ago = data["days"].index((datetime.now(UTC) - timedelta(days=10)).date().isoformat())
    assert _user(data, "alice")["requests"][-1] == 3
    assert _user(data, "alice")["tokens"][-1] == 3 * 7  # the fake backend's usage: 5 + 2
    assert _user(data, "bob")["requests"][-1] == 1
    assert _user(data, "bob")["requests"][ten_days_ago] == 1
    assert _user(data, "(no key)")["requests"][-1] == 1  # the 401
    series = data["series"]
    assert series["requests"][-1] == 5
    assert series["errors"][-1] == 1
    assert series["errors"][ten_days_ago] == 1
    assert series["p50_ms"][-1] is not None
    assert series["ttfb_p95_ms"][-1] is not None
    assert series["ttfb_p50_ms"][ten_days_ago] is None  # the only row that day has no TTFB
    assert series["cached_share"][-1] == 0.0  # no row says its prompt came from the cache
    assert data["summary"] == {
        "requests": 6, "tokens": 4 * 7, "errors": 2, "error_share": 33.3, "users": 2,
        "cached_share": 0.0,
    }  # fmt: skip
    assert [u["name"] for u in data["top"]] == ["alice", "bob", "(no key)"]
    assert 'id="requests-chart"' in page


async def test_overview_shows_the_share_of_prompt_tokens_from_the_cache(
    db_dsn: str, tmp_path: Path
) -> None:
    _, token = await make_admin_token(db_dsn)
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute(
            """INSERT INTO llama_requests (username, path, status_code, duration_ms,
                                           prompt_tokens, completion_tokens, cached_tokens)
               VALUES ('alice', '/v1/chat/completions', 200, 10, 100, 5, 75),
                      ('alice', '/v1/chat/completions', 200, 10, 100, 5, 25)"""
        )
    finally:
        await con.close()
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        await sign_in(http, dashboard, token)
        data, page = await _overview(http, dashboard)
        async with http.get(dashboard.at("/requests")) as r:
            log = await r.text()
        async with http.get(dashboard.at("/requests.csv")) as r:
            rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert data["series"]["cached_share"][-1] == 50.0
    assert data["summary"]["cached_share"] == 50.0
    assert 'id="cached-chart"' in page
    assert "50.0 %" in page
    assert '<th class="n">cached</th>' in log
    assert sorted(row["cached_tokens"] for row in rows) == ["25", "75"]


async def test_live_shows_backends_and_each_users_requests(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    gate = asyncio.Event()
    upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=gate)
    async with (
        running_dashboard(db_dsn, tmp_path, upstream=upstream) as dashboard,  # type: ignore[arg-type]
        client() as http,
    ):
        await sign_in(http, dashboard, token)

        async def chat(key: str) -> int:
            body = {**CHAT, "stream": True}
            url = dashboard.proxy.url("/v1/chat/completions")
            async with http.post(url, json=body, headers=bearer(key)) as r:
                await r.read()
                return r.status

        held = [asyncio.create_task(chat(alice))]
        await upstream.received.wait()
        held.append(asyncio.create_task(chat(bob)))
        for _ in range(100):  # until bob's request waits for the one slot
            async with http.get(dashboard.at("/live.json")) as r:
                live = await r.json()
            if live["queued"] == 1:
                break
            await asyncio.sleep(0.02)
        async with http.get(dashboard.at("/live")) as r:
            page = await r.text()
        gate.set()
        assert await asyncio.gather(*held) == [200, 200]

    backend = live["backends"][0]
    assert backend["up"] is True
    assert (backend["busy"], backend["slots"], backend["queued"]) == (1, 1, 1)
    assert backend["models"] == ["smollm2-test"]
    assert backend["default"] == "smollm2-test"
    assert live["users"] == [
        {"username": "alice", "served": 1, "queued": 0},
        {"username": "bob", "served": 0, "queued": 1},
    ]
    assert (live["served"], live["queued"]) == (1, 1)
    assert live["database_up"] is True
    assert "smollm2-test (default)" in page
    assert "<td>bob</td>" in page


async def _write_log(dsn: str) -> None:
    """120 rows a minute apart, newest last: alice and bob alternate, every 10th a 429."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            """INSERT INTO llama_requests (username, path, status_code, duration_ms, error,
                                           created_at)
               SELECT CASE WHEN n % 2 = 0 THEN 'alice' ELSE 'bob' END,
                      CASE WHEN n = 7 THEN '=HYPERLINK("http://x")' ELSE '/v1/chat/completions'
                      END,
                      CASE WHEN n % 10 = 0 THEN 429 ELSE 200 END, n,
                      CASE WHEN n % 10 = 0 THEN 'rate limited' END,
                      timestamptz '2026-11-01 12:00:00+00' + n * interval '1 minute'
               FROM generate_series(1, 120) AS n"""
        )
    finally:
        await con.close()


def _durations(page: str) -> list[int]:
    """Each row's duration (the test rows' duration_ms is their n), in page order."""
    rows = re.findall(r'<td class="n status">\d+</td>\s*<td class="n">([\d,]+)</td>', page)
    return [int(value.replace(",", "")) for value in rows]


async def test_requests_newest_first_a_page_at_a_time(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    await _write_log(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        await sign_in(http, dashboard, token)
        seen: list[int] = []
        url = dashboard.at("/requests")
        while True:
            async with http.get(url) as r:
                assert r.status == 200
                page = await r.text()
            seen += _durations(page)
            older = re.search(r'<a href="(/requests\?[^"]+)" id="older"', page)
            if older is None:
                break
            url = dashboard.at(html.unescape(older.group(1)))
        assert seen == list(range(120, 0, -1))

        async def durations(query: str) -> list[int]:
            async with http.get(dashboard.at("/requests?" + query)) as r:
                assert r.status == 200, await r.text()
                return _durations(await r.text())

        assert await durations("user=alice&status=4xx") == list(range(120, 0, -10))
        assert await durations("status=429&user=BOB") == []
        assert (await durations("status=200&user=alice"))[:3] == [118, 116, 114]
        assert await durations("path=%3DHYPERLINK(%22http%3A%2F%2Fx%22)") == [7]
        since, until = "2026-11-01T12:05", "2026-11-01T12:08:00"
        assert await durations(f"since={since}&until={until}") == [7, 6, 5]
        for bad, message in (
            ("status=abc", "is neither a status code"),
            ("since=yesterday", "is not a time"),
            ("user=%20bad%20name!", "is not a valid username"),
            ("before=garbage", "That page link is damaged"),
        ):
            async with http.get(dashboard.at("/requests?" + bad)) as r:
                assert r.status == 400, bad
                assert message in await r.text()


async def test_requests_export_as_csv(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    await _write_log(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        await sign_in(http, dashboard, token)
        async with http.get(dashboard.at("/requests.csv?user=bob")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert r.headers["Content-Disposition"].startswith('attachment; filename="llama-req')
            text = await r.text()
        async with http.get(dashboard.at("/requests.csv")) as r:
            everything = list(csv.DictReader(io.StringIO(await r.text())))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(float(row["duration_ms"])) for row in rows] == list(range(119, 0, -2))
    assert {row["username"] for row in rows} == {"bob"}
    assert rows[-1]["created_at"] == "2026-11-01T12:01:00+00:00"
    assert len(everything) == 120
    formula = next(row for row in everything if row["duration_ms"] == "7.0")
    assert formula["path"] == '\'=HYPERLINK("http://x")'  # text in a spreadsheet, never run


async def test_live_shows_every_proxy_process(db_dsn: str, tmp_path: Path) -> None:
    """Another process's requests and the process itself, from its row of llama_proxies; a
    process that stops leaves, and one that went silent (killed) is dropped."""
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    con = await asyncpg.connect(db_dsn)
    try:  # a process killed a minute ago: its row was never deleted
        await con.execute(
            """INSERT INTO llama_proxies (id, host, pid, seen_at, live)
               VALUES ('gone:1:x', 'gone', 1, now() - interval '1 minute',
                       '{"backends": [], "users": {"1": [5, 5]}}')"""
        )
    finally:
        await con.close()
    gate = asyncio.Event()
    held_upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=gate)
    async with (
        running_dashboard(db_dsn, tmp_path / "b") as dashboard,
        client() as http,
    ):
        await sign_in(http, dashboard, token)
        async with running_proxy(db_dsn, tmp_path / "a", held_upstream) as other:

            async def chat() -> int:
                url = other.url("/v1/chat/completions")
                async with http.post(url, json=CHAT, headers=bearer(alice)) as r:
                    await r.read()
                    return r.status

            held = asyncio.create_task(chat())
            await held_upstream.received.wait()
            for _ in range(100):  # until the other process's next beat (every 2 s) tells it
                async with http.get(dashboard.at("/live.json")) as r:
                    live = await r.json()
                # Both from one beat made once the request holds the backend: a beat between
                # its admission and its turn at the backend says served 1 but busy 0.
                busy_all = [b["busy_all"] for b in live["backends"]]
                if live["served"] == 1 and busy_all == [1]:
                    break
                await asyncio.sleep(0.1)
            async with http.get(dashboard.at("/live")) as r:
                page = await r.text()
            gate.set()
            assert await held == 200
        async with http.get(dashboard.at("/live.json")) as r:
            after = await r.json()

    assert live["users"] == [{"username": "alice", "served": 1, "queued": 0}]
    processes = live["processes"]
    assert [p["this"] for p in processes] == [True, False]  # the killed one is not among them
    assert (processes[0]["served"], processes[1]["served"]) == (0, 1)
    assert processes[1]["pid"] == processes[0]["pid"]  # both in this test's process, apart
    assert processes[0]["id"] != processes[1]["id"]
    backend = live["backends"][0]
    assert (backend["busy"], backend["busy_all"]) == (0, 1)  # each has its own fake backend
    assert "(this one)" in page
    assert '<table id="processes">' in page
    # The other process stopped and deleted its row; the stale one was deleted by a beat.
    assert [p["this"] for p in after["processes"]] == [True]
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM llama_proxies WHERE host = 'gone'") == 0
    finally:
        await con.close()


async def test_a_database_without_the_presence_table_costs_the_proxy_nothing(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Proxies started before `init-db` added llama_proxies (or with its row gone) serve on."""
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute("DROP TABLE llama_proxies")
    finally:
        await con.close()
    _, alice = await make_user(db_dsn, "alice")
    async with running_proxy(db_dsn, tmp_path) as proxy:
        assert await proxy.app[PRESENCE].peers() == []
        live = await snapshot(proxy.app)
        assert [p["this"] for p in live["processes"]] == [True]
        async with (
            aiohttp.ClientSession() as http,
            http.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(alice)) as r,
        ):
            assert r.status == 200
    assert "cannot record this process's presence (UndefinedTableError)" in caplog.text
