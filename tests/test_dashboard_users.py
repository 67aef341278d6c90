"""The Users page's actions take effect on every proxy within a second, like the CLI's."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

from proxy.appkeys import AUTHENTICATOR
from proxy.auth.apikeys import parse_key
from proxy.auth.issuing import issue_key
from proxy.db import accounts
from tests.dashboard_helpers import (
    Dashboard,
    client,
    make_admin_token,
    running_dashboard,
    sign_in,
    wait_for_rows,
)
from tests.proxy_harness import Harness, add_key, bearer, make_user, running_proxy

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
_KEY_RE = re.compile(r'<pre class="secret" id="new-key">(lgk_[0-9a-f]{16}_[A-Za-z0-9_-]{43})</pre>')


async def _chat(http: aiohttp.ClientSession, proxy: Harness, key: str) -> int:
    async with http.post(proxy.url("/v1/chat/completions"), json=CHAT, headers=bearer(key)) as r:
        await r.read()
        return r.status


async def _until(http: aiohttp.ClientSession, proxy: Harness, key: str, status: int) -> float:
    """Seconds until a request with `key` gets `status` (at most 3)."""
    started = time.monotonic()
    while await _chat(http, proxy, key) != status:
        assert time.monotonic() - started < 3, f"still not {status}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _section(page: str, username: str) -> str:
    """The part of the Users page about `username`."""
    match = re.search(
        rf'<section class="user[^"]*" id="user-{username}">(.*?)</section>', page, re.S
    )
    assert match, page[:2000]
    return match.group(1)


def _fact(section: str, name: str) -> str:
    """What a user's section says after `name` (its facts: rate limit, tokens today, ...)."""
    match = re.search(rf"<dt>{name}</dt><dd[^>]*>(.*?)</dd>", section, re.S)
    assert match, (name, section)
    return match.group(1)


def _key_cells(section: str, key_id: str) -> dict[str, str]:
    """A key's row in a user's section: label, state, created, last use, expires."""
    match = re.search(
        rf'<tr class="key-\w+"><td><code>{key_id}</code></td>(.*?)</tr>', section, re.S
    )
    assert match, (key_id, section)
    cells = re.findall(r"<td>(.*?)</td>", match.group(1), re.S)  # the actions cell has a class
    return dict(zip(["label", "state", "created", "last use", "expires"], cells, strict=True))


def _scope_cell(section: str, key_id: str) -> str:
    """What a key's row says of its scope: `all`, or the models and APIs it may use."""
    row = re.search(
        rf"<tr class=\"key-\w+\"><td><code>{key_id}</code></td>(.*?)</tr>", section, re.S
    )
    assert row, (key_id, section)
    cell = re.search(r'<td class="scope">(.*?)</td>', row.group(1), re.S)
    assert cell, row.group(1)
    return cell.group(1).strip()


def _shown_time(text: str) -> datetime:
    """A timestamp as the dashboard shows it (UTC, to the second)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=UTC)


async def _act(
    http: aiohttp.ClientSession, dashboard: Dashboard, path: str, csrf: str, **form: str
) -> tuple[int, str]:
    async with http.post(dashboard.at(path), data={"csrf": csrf, **form}) as r:
        return r.status, await r.text()


async def test_each_action_reaches_another_proxy_within_a_second(
    db_dsn: str, tmp_path: Path
) -> None:
    _, token = await make_admin_token(db_dsn)
    _, alice = await make_user(db_dsn, "alice")
    async with (
        running_dashboard(db_dsn, tmp_path / "a") as dashboard,
        running_proxy(db_dsn, tmp_path / "b") as other,
        client() as http,
    ):
        csrf = await sign_in(http, dashboard, token)
        assert await _chat(http, other, alice) == 200  # cached by the other proxy now

        status, page = await _act(http, dashboard, "/users/alice/disable", csrf)
        assert status == 200
        assert "Disabled alice" in page
        assert await _until(http, other, alice, 401) < 1.0
        status, page = await _act(http, dashboard, "/users/alice/enable", csrf)
        assert "Enabled alice." in page
        assert await _until(http, other, alice, 200) < 1.0

        status, page = await _act(http, dashboard, "/users/alice/limits", csrf, rate_limit="1",
                                  rate_window_seconds="3600")  # fmt: skip
        assert "Saved alice&#39;s limits" in page
        assert await _until(http, other, alice, 429) < 1.0

        key_id = alice.split("_")[1]
        status, page = await _act(http, dashboard, f"/keys/{key_id}/revoke", csrf)
        assert f"Revoked key {key_id}" in page
        assert await _until(http, other, alice, 401) < 1.0


async def test_create_user_shows_the_key_once_and_it_works(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        csrf = await sign_in(http, dashboard, token)
        status, page = await _act(http, dashboard, "/users", csrf, username="Bob", label="laptop",
                                  expires="90d")  # fmt: skip
        assert status == 200
        assert "Created user bob" in page
        match = _KEY_RE.search(page)
        assert match, page
        key = match.group(1)
        assert await _chat(http, dashboard.proxy, key) == 200
        async with http.get(dashboard.at("/users")) as r:
            users = await r.text()
        assert key not in users
        assert key.split("_")[1] in users  # the key id is public
        assert "laptop" in users
        # A second user by the same name, or a bad name, is refused with a reason.
        status, page = await _act(http, dashboard, "/users", csrf, username="bob", expires="")
        assert status == 409
        assert "A user named bob already exists" in page
        status, page = await _act(http, dashboard, "/users", csrf, username="no spaces!",
                                  expires="")  # fmt: skip
        assert status == 400
        assert "is not a valid username" in page
        status, page = await _act(http, dashboard, "/users", csrf, username="carol",
                                  expires="forever")  # fmt: skip
        assert status == 400
    con = await asyncpg.connect(db_dsn)
    try:
        rows = await con.fetch("SELECT username FROM users ORDER BY username")
        secret_hash = await con.fetchval("SELECT secret_hash FROM api_keys")
    finally:
        await con.close()
    assert [r["username"] for r in rows] == ["bob"]
    assert secret_hash.startswith("$argon2id$")
    parsed = parse_key(key)  # the secret may hold "_" itself: split as the proxy does
    assert parsed is not None
    assert parsed[1] not in secret_hash


async def test_new_and_rotated_keys(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    _, old = await make_user(db_dsn, "alice")
    old_id = old.split("_")[1]
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        csrf = await sign_in(http, dashboard, token)
        status, page = await _act(http, dashboard, "/users/alice/keys", csrf, label="ci",
                                  expires="")  # fmt: skip
        assert status == 200
        assert "A new key for alice" in page
        second = _KEY_RE.search(page)
        assert second
        assert await _chat(http, dashboard.proxy, second.group(1)) == 200
        # Rotating with a grace period: both work until it ends.
        status, page = await _act(http, dashboard, f"/keys/{old_id}/rotate", csrf, grace="1h")
        assert status == 200
        assert f"Key {old_id} of alice replaced; it stops working in 1h" in page
        rotated = _KEY_RE.search(page)
        assert rotated
        assert await _chat(http, dashboard.proxy, rotated.group(1)) == 200
        assert await _chat(http, dashboard.proxy, old) == 200
        async with http.get(dashboard.at("/users")) as r:
            assert "retiring" in await r.text()
        status, page = await _act(http, dashboard, f"/keys/{old_id}/revoke", csrf)
        assert await _until(http, dashboard.proxy, old, 401) < 1.0
        # Now it is revoked: it cannot be rotated, and unknown keys are no 500 either.
        status, page = await _act(http, dashboard, f"/keys/{old_id}/rotate", csrf, grace="0")
        assert status == 409
        assert "revoked already" in page
        status, page = await _act(http, dashboard, "/keys/0000000000000000/revoke", csrf)
        assert status == 404
        status, page = await _act(http, dashboard, "/keys/not-a-key/revoke", csrf)
        assert status == 400
        status, page = await _act(http, dashboard, "/users/nobody/disable", csrf)
        assert status == 404
        assert "There is no user named nobody" in page


async def test_limits_are_checked_and_blank_means_the_default(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    await make_user(db_dsn, "alice")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        csrf = await sign_in(http, dashboard, token)
        for bad, message in (
            ({"rate_limit": "abc"}, "requests per window: &#39;abc&#39; is not a whole number"),
            ({"max_tokens": "0"}, "max_tokens cap: &#39;0&#39; is not a whole number above 0"),
            ({"tokens_per_day": "3000000000"}, "at most 2147483647"),
        ):
            status, page = await _act(http, dashboard, "/users/alice/limits", csrf, **bad)
            assert status == 400, bad
            assert message in page
        status, _ = await _act(http, dashboard, "/users/alice/limits", csrf, tokens_per_day="5000",
                               max_concurrent="2", rate_limit="default")  # fmt: skip
        assert status == 200
        async with http.get(dashboard.at("/users")) as r:
            page = await r.text()
        assert "of 5,000 per day" in page
    con = await asyncpg.connect(db_dsn)
    try:
        row = await con.fetchrow("SELECT * FROM users WHERE username = 'alice'")
    finally:
        await con.close()
    assert row["tokens_per_day"] == 5000
    assert row["max_concurrent"] == 2
    assert row["rate_limit"] is None
    assert row["max_tokens"] is None


async def test_users_show_todays_use_and_each_keys_last_use(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    alice_id, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    con = await asyncpg.connect(db_dsn)
    try:
        spare = await add_key(con, alice_id)  # never used
        scoped = await issue_key(con, alice_id, "ci", None, ["qwen*", "phi3"], ["embeddings"])
        await con.execute(
            "UPDATE users SET tokens_per_day = 5000, tokens_per_minute = 1000 WHERE id = $1",
            alice_id,
        )
        # Yesterday's use is not today's (in UTC, as the quota counts days).
        await con.execute(
            """INSERT INTO llama_requests (user_id, username, path, status_code, duration_ms,
                                           prompt_tokens, completion_tokens, created_at)
               VALUES ($1, 'alice', '/v1/chat/completions', 200, 10, 900, 100,
                       date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                       - interval '1 minute')""",
            alice_id,
        )
    finally:
        await con.close()
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        before = datetime.now(UTC).replace(microsecond=0)
        for key in (alice, alice, alice, bob):
            assert await _chat(http, dashboard.proxy, key) == 200
        await wait_for_rows(db_dsn, 5)
        # Keys' last use is written about once a minute (and at shutdown): now, for the test.
        await dashboard.proxy.app[AUTHENTICATOR].flush_last_used()
        after = datetime.now(UTC)
        await sign_in(http, dashboard, token)
        async with http.get(dashboard.at("/users")) as r:
            assert r.status == 200
            page = await r.text()

    alice_part, bob_part = _section(page, "alice"), _section(page, "bob")
    assert _fact(alice_part, "tokens today") == "21 of 5,000 per day"  # 3 requests of 5 + 2
    assert _fact(alice_part, "last minute") == "21 of 1,000 per minute"
    assert _fact(alice_part, "requests today") == "3"
    assert _fact(bob_part, "tokens today") == "7"  # no quota: the use alone
    assert _fact(bob_part, "requests today") == "1"
    assert "last minute" not in bob_part

    used = _key_cells(alice_part, alice.split("_")[1])
    assert before <= _shown_time(used["last use"]) <= after, used
    assert _fact(alice_part, "last use") == used["last use"]  # the user's: their latest key's
    assert _key_cells(alice_part, spare.split("_")[1])["last use"] == "never"
    assert _scope_cell(alice_part, spare.split("_")[1]) == "all"
    shown = _scope_cell(alice_part, scoped.key_id)
    assert shown == "models <code>qwen*, phi3</code> APIs <code>embeddings</code>"
    bobs = _key_cells(bob_part, bob.split("_")[1])
    assert before <= _shown_time(bobs["last use"]) <= after, bobs


async def test_a_quota_shows_its_users_use_not_a_deleted_namesakes(
    db_dsn: str, tmp_path: Path
) -> None:
    """An account deleted and made again under its name starts its quota afresh, and the page
    shows the figure the quota goes by (the audit rows keep the old account's name)."""
    _, token = await make_admin_token(db_dsn)
    old_id, _ = await make_user(db_dsn, "alice")
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute(
            """INSERT INTO llama_requests (user_id, username, path, status_code, duration_ms,
                                           prompt_tokens, completion_tokens)
               VALUES ($1, 'alice', '/v1/chat/completions', 200, 10, 4100, 900)""",
            old_id,
        )
        assert await accounts.delete_user(con, "alice")
    finally:
        await con.close()
    alice_id, alice = await make_user(db_dsn, "alice")
    con = await asyncpg.connect(db_dsn)
    try:
        await con.execute("UPDATE users SET tokens_per_day = 5000 WHERE id = $1", alice_id)
    finally:
        await con.close()
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        for _ in range(2):  # refused if the old account's 5,000 tokens counted
            assert await _chat(http, dashboard.proxy, alice) == 200
        await wait_for_rows(db_dsn, 3)
        await sign_in(http, dashboard, token)
        async with http.get(dashboard.at("/users")) as r:
            page = await r.text()
    assert _fact(_section(page, "alice"), "tokens today") == "14 of 5,000 per day"
