"""The Users page's actions take effect on every proxy within a second, like the CLI's."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import asyncpg

from tests.dashboard_helpers import Dashboard, client, make_admin_token, running_dashboard, sign_in
from tests.proxy_harness import Harness, bearer, make_user, running_proxy

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
    assert key.rsplit("_", 1)[1] not in secret_hash


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
