"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Every test saves screenshots of the pages it visits in runtime/screenshots/ (ignored by git).
`runtime/install.sh --dev` (run by bin/test.sh) installs playwright, and chromium with apt-get.
Without either, these tests fail and say so: a green run proves the dashboard worked in a browser.
On a machine that cannot have them, set LLAMA_GATE_SKIP_BROWSER=1 to skip them instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.dashboard_helpers import Dashboard, make_admin_token, running_dashboard, wait_for_rows
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, ROOT, bearer, make_user, running_proxy

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # each test fails and says what to do (`_browser_at_hand`)
    PLAYWRIGHT = False
else:
    PLAYWRIGHT = True

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SKIP = "LLAMA_GATE_SKIP_BROWSER"
# Playwright's own browser download needs a network this machine may not have.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ROOT / "runtime" / "screenshots"
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
# For page.evaluate's scripts (`with_painted`): how many pixels of a canvas are painted.
PAINTED = """const painted = (id) => {
    const canvas = document.getElementById(id);
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let count = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) count++;
    return count;
};
"""


def with_painted(script: str) -> str:
    """`script` (an arrow function) as one page.evaluate can run, with `painted(id)` at hand."""
    return f"() => {{ {PAINTED} return ({script})(); }}"


PAGES = ("/", "/live", "/users", "/groups", "/requests", "/requests?user=alice")


@pytest.fixture(autouse=True)
def _browser_at_hand() -> None:
    """Skipped only when asked to; a missing browser otherwise fails each test."""
    if os.environ.get(SKIP, "") not in ("", "0"):
        pytest.skip(f"{SKIP} is set")
    missing = [
        *([] if PLAYWRIGHT else ["playwright"]),
        *([] if Path(CHROMIUM).exists() else ["chromium"]),
    ]
    if missing:
        what = " and ".join(missing) + (" is" if len(missing) == 1 else " are")
        pytest.fail(
            f"{what} not installed: run runtime/install.sh --dev (as root, for apt-get to "
            f"install Debian's chromium), or set {SKIP}=1 to skip the browser tests",
            pytrace=False,
        )


@asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh browser page, and the console errors it logs (a CSP violation would be one)."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            await browser.close()


async def shoot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, dashboard: Dashboard, token: str, path: str = "/") -> None:
    await page.goto(dashboard.at(path))
    assert "/login" in page.url
    await shoot(page, "sign-in")
    await page.fill("#token", token)
    await page.click("form[action='/login'] button[type=submit]")
    await page.wait_for_load_state("networkidle")
    assert page.url == dashboard.at(path), page.url


async def _chat(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.post(url, json=CHAT, headers=bearer(key)) as r:
        await r.read()
        return r.status


async def test_sign_in_and_see_a_chart_of_the_requests_made(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    async with (
        running_dashboard(db_dsn, tmp_path) as dashboard,
        aiohttp.ClientSession() as http,
        browser_page() as (page, errors),
    ):
        url = dashboard.proxy.url("/v1/chat/completions")
        for key in (alice, alice, alice, alice, bob):
            assert await _chat(http, url, key) == 200
        await wait_for_rows(db_dsn, 5)
        await sign_in(page, dashboard, token)
        await page.wait_for_function("() => Chart.getChart('requests-chart') !== undefined")
        drawn = await page.evaluate(
            with_painted(
                """() => {
                const chart = Chart.getChart('requests-chart');
                return {
                    labels: chart.data.labels,
                    today: Object.fromEntries(chart.data.datasets.map(
                        (d) => [d.label, d.data[d.data.length - 1]])),
                    painted: painted('requests-chart'),
                    charts: ['tokens-chart', 'errors-chart', 'latency-chart', 'ttfb-chart']
                        .map((id) => Chart.getChart(id) !== undefined),
                };
            }"""
            )
        )
        await shoot(page, "overview")
        assert drawn["today"] == {"alice": 4, "bob": 1}
        assert len(drawn["labels"]) == 30
        assert drawn["painted"] > 1000  # bars, axes and legend, not a blank canvas
        assert drawn["charts"] == [True] * 4
        assert await page.inner_text("#total-requests") == "5"
        assert errors == []


async def test_the_groups_page_charts_each_groups_tokens(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    con = await asyncpg.connect(db_dsn)
    try:
        for name, member in (("red", "alice"), ("blue", "bob")):
            await con.execute(
                """WITH g AS (INSERT INTO llama_groups (name, tokens_per_month)
                              VALUES ($1, 1000000) RETURNING id)
                   INSERT INTO llama_group_members SELECT g.id, u.id FROM g, users u
                   WHERE u.username = $2""",
                name,
                member,
            )
    finally:
        await con.close()
    async with (
        running_dashboard(db_dsn, tmp_path) as dashboard,
        aiohttp.ClientSession() as http,
        browser_page() as (page, errors),
    ):
        url = dashboard.proxy.url("/v1/chat/completions")
        for key in (alice, alice, bob):
            assert await _chat(http, url, key) == 200
        await wait_for_rows(db_dsn, 3)
        await sign_in(page, dashboard, token, "/groups")
        await page.wait_for_function("() => Chart.getChart('groups-tokens-chart') !== undefined")
        drawn = await page.evaluate(
            with_painted(
                """() => {
                const chart = Chart.getChart('groups-tokens-chart');
                return {
                    today: Object.fromEntries(chart.data.datasets.map(
                        (d) => [d.label, d.data[d.data.length - 1]])),
                    painted: painted('groups-tokens-chart'),
                };
            }"""
            )
        )
        await shoot(page, "groups")
        text = await page.inner_text("main")
    # FakeUpstream's answers are 5 + 2 tokens each.
    assert drawn["today"] == {"blue": 7, "red": 14}
    assert drawn["painted"] > 1000
    assert "alice" in text
    assert "bob" in text
    assert "per month" in text
    assert errors == []


async def test_disable_a_user_and_their_next_request_is_refused(
    db_dsn: str, tmp_path: Path
) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    async with (
        running_dashboard(db_dsn, tmp_path / "a") as dashboard,
        running_proxy(db_dsn, tmp_path / "b") as other,  # another proxy on the same database
        aiohttp.ClientSession() as http,
        browser_page() as (page, errors),
    ):
        url = other.url("/v1/chat/completions")
        assert await _chat(http, url, alice) == 200  # now in the other proxy's key cache
        await sign_in(page, dashboard, token, "/users")
        await shoot(page, "users")
        await page.click("#user-alice button[data-action=disable]")
        await page.wait_for_load_state("networkidle")
        disabled_at = time.monotonic()
        assert "Disabled alice" in await page.inner_text(".notice")
        assert await page.inner_text("#user-alice .badge") == "disabled"
        while (status := await _chat(http, url, alice)) == 200:
            assert time.monotonic() - disabled_at < 1.0, "the other proxy still lets alice in"
            await asyncio.sleep(0.05)
        assert status == 401
        await shoot(page, "users-after-disable")
        assert errors == []


async def test_an_action_without_its_csrf_token_is_refused(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    await make_user(db_dsn, "alice")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, browser_page() as (page, _):
        await sign_in(page, dashboard, token, "/users")
        # A form that lost its token, as a forged cross-site form would have none.
        await page.evaluate(
            "() => document.querySelector('#user-alice form input[name=csrf]').remove()"
        )
        async with page.expect_response(dashboard.at("/users/alice/disable")) as answer:
            await page.click("#user-alice button[data-action=disable]")
        assert (await answer.value).status == 403
        assert "without the dashboard's security token" in await page.inner_text("main")
        await shoot(page, "refused-without-csrf")
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval("SELECT enabled FROM users WHERE username = 'alice'")
    finally:
        await con.close()


async def test_every_page_is_refused_without_signing_in(db_dsn: str, tmp_path: Path) -> None:
    await make_user(db_dsn, "alice")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, browser_page() as (page, _):
        for path in PAGES:
            response = await page.goto(dashboard.at(path))
            assert response is not None
            assert page.url.startswith(dashboard.at("/login?next=")), (path, page.url)
            assert await page.inner_text("h1") == "Sign in"
            assert "alice" not in await page.inner_text("main")
        live = await page.request.get(dashboard.at("/live.json"))
        assert live.status == 401
        csv = await page.request.get(dashboard.at("/requests.csv"), max_redirects=0)
        assert csv.status == 303


async def test_live_refreshes_and_requests_export(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    gate = asyncio.Event()
    upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=gate)
    async with (
        running_dashboard(db_dsn, tmp_path, upstream=upstream) as dashboard,  # type: ignore[arg-type]
        aiohttp.ClientSession() as http,
        browser_page() as (page, errors),
    ):
        await sign_in(page, dashboard, token, "/live")
        assert "Nobody has a request in flight" in await page.inner_text("#live-users")
        url = dashboard.proxy.url("/v1/chat/completions")
        body = {**CHAT, "stream": True}

        async def held() -> int:
            async with http.post(url, json=body, headers=bearer(alice)) as r:
                await r.read()
                return r.status

        request = asyncio.create_task(held())
        # The page asks /live.json again by itself: no reload.
        await page.wait_for_selector("#live-users td:text-is('alice')", timeout=10_000)
        assert await page.inner_text("#live-served") == "1"
        await shoot(page, "live")
        gate.set()
        assert await request == 200
        await wait_for_rows(db_dsn, 1)

        await page.goto(dashboard.at("/requests"))
        assert "/v1/chat/completions" in await page.inner_text("#request-log")
        await shoot(page, "requests")
        async with page.expect_download() as download:
            await page.click("text=Export CSV")
        path = await (await download.value).path()
        lines = (await asyncio.to_thread(Path(path).read_text)).splitlines()
        assert lines[0].startswith("id,created_at,username,key_id,method,path")
        assert len(lines) == 2
        assert ",alice," in lines[1]
        assert errors == []


async def test_thirty_days_of_ten_users_stack_the_heaviest_by_name(
    db_dsn: str, tmp_path: Path
) -> None:
    """The Overview of a month of traffic (its screenshot is README's docs/dashboard.png)."""
    _, token = await make_admin_token(db_dsn)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute(
            """INSERT INTO llama_requests (username, path, status_code, duration_ms, ttfb_ms,
                                           prompt_tokens, completion_tokens, created_at)
               SELECT u.name,
                      '/v1/chat/completions',
                      CASE WHEN n % 37 = 0 THEN 429 WHEN n % 101 = 0 THEN 502 ELSE 200 END,
                      800 + (n * 7919) % 4000, 150 + (n * 104729) % 900,
                      40 + n % 300, 20 + (n * 31) % 400,
                      now() - d * interval '1 day' - (n % 600) * interval '1 second'
               FROM unnest($1::text[]) WITH ORDINALITY AS u(name, rank),
                    generate_series(0, 29) AS d,
                    generate_series(1, 200) AS n
               WHERE n <= (12 - u.rank) * (8 + (d * 7 + u.rank * 3) % 9)""",
            names,
        )
    finally:
        await con.close()
    async with running_dashboard(db_dsn, tmp_path) as dashboard, browser_page() as (page, errors):
        await page.set_viewport_size({"width": 1280, "height": 1100})
        await sign_in(page, dashboard, token)
        stacks = await page.evaluate(
            "() => Chart.getChart('tokens-chart').data.datasets.map((d) => d.label)"
        )
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / "overview-30-days.png"))
    assert stacks == [*names[:8], "2 others"]
    assert errors == []


async def test_a_user_signs_in_with_their_key_and_sees_only_their_own_usage(
    db_dsn: str, tmp_path: Path
) -> None:
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    async with (
        running_dashboard(db_dsn, tmp_path) as dashboard,
        aiohttp.ClientSession() as http,
        browser_page() as (page, errors),
    ):
        url = dashboard.proxy.url("/v1/chat/completions")
        for key in (alice, alice, alice, bob, bob):
            assert await _chat(http, url, key) == 200
        await wait_for_rows(db_dsn, 5)
        await page.goto(dashboard.at("/login"))
        await page.fill("#token", alice)
        await page.click("form[action='/login'] button[type=submit]")
        await page.wait_for_load_state("networkidle")
        assert page.url == dashboard.at("/me"), page.url
        await page.wait_for_function("() => Chart.getChart('my-requests-chart') !== undefined")
        drawn = await page.evaluate(
            with_painted(
                """() => ({
                datasets: Chart.getChart('my-requests-chart').data.datasets
                    .map((d) => [d.label, d.data]),
                painted: painted('my-requests-chart'),
                tokens: Chart.getChart('my-tokens-chart') !== undefined,
                nav: [...document.querySelectorAll('nav a')].map((a) => a.textContent),
            })"""
            )
        )
        text = await page.inner_text("main")
        await shoot(page, "my-usage")
        assert drawn["datasets"] == [["requests", [3]]]  # today: alice's three, not bob's
        assert drawn["painted"] > 1000
        assert drawn["tokens"] is True
        assert drawn["nav"] == ["My usage"]
        assert "alice" in text
        assert "bob" not in text
        assert alice.split("_")[1] in text  # her key, with its last use
        assert text.count("/v1/chat/completions") == 3  # her latest requests, only hers

        # Every admin page is refused; the overview sends her back to her own page.
        admin_pages = ("/live", "/users", "/groups", "/requests", "/requests?user=bob")
        for path in (*admin_pages, "/requests.csv"):
            response = await page.goto(dashboard.at(path))
            assert response is not None
            assert response.status == 403, path
            assert "this page is for administrators" in await page.inner_text("main")
            assert "bob" not in (await page.content()).replace("user=bob", ""), path
        await page.goto(dashboard.at("/"))
        assert page.url == dashboard.at("/me")
        live = await page.evaluate(
            "async () => (await fetch('/live.json', {credentials: 'same-origin'})).status"
        )
        assert live == 403
        # The browser logs each refused page as a failed load; nothing else went wrong.
        assert [e for e in errors if "status of 403" not in e] == []
        assert len(errors) == len(admin_pages) + 2  # with /requests.csv and /live.json
