"""The dashboard's doors: its own listener, sign-in with admin tokens, sessions, CSRF tokens."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from yarl import URL

from proxy.auth.issuing import issue_key
from proxy.dashboard import sessions as sessions_module
from proxy.dashboard.render import SECURITY_HEADERS
from proxy.db.limits import set_key_limits
from tests.cli_helpers import KEY_RE
from tests.dashboard_helpers import (
    Dashboard,
    client,
    csrf_in,
    make_admin_token,
    running_dashboard,
    sign_in,
)
from tests.proxy_harness import bearer, make_user, running_proxy

PAGES = (
    "/",
    "/live",
    "/users",
    "/groups",
    "/requests",
    "/requests.csv",
    "/requests?status=4xx",
    "/nowhere",
)
ACTIONS = (
    "/users",
    "/users/alice/disable",
    "/users/alice/enable",
    "/users/alice/keys",
    "/users/alice/limits",
    "/keys/0123456789abcdef/revoke",
    "/keys/0123456789abcdef/rotate",
    "/logout",
)


async def test_nothing_is_served_without_signing_in(db_dsn: str, tmp_path: Path) -> None:
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        for path in PAGES:
            async with http.get(dashboard.at(path), allow_redirects=False) as r:
                assert r.status == 303, path
                assert r.headers["Location"].startswith("/login?next=")
                assert await r.read() == b""
        async with http.get(dashboard.at("/live.json")) as r:
            assert r.status == 401
            assert await r.json() == {"error": "sign in first"}
        for path in ACTIONS:
            async with http.post(dashboard.at(path), data={"csrf": "x"}) as r:
                assert r.status == 403, path
                assert "Sign in first" in await r.text()
        # A made-up session cookie is no session.
        http.cookie_jar.update_cookies({"llama_gate_session": "forged"}, URL(dashboard.url))
        async with http.get(dashboard.at("/users"), allow_redirects=False) as r:
            assert r.status == 303
        # What is public holds nothing secret: the sign-in form and the static files.
        async with http.get(dashboard.at("/login")) as r:
            assert r.status == 200
            for header, value in SECURITY_HEADERS.items():
                assert r.headers[header] == value
            assert r.headers["Cache-Control"] == "no-store"
        async with http.get(dashboard.at("/static/chart.umd.min.js")) as r:
            assert r.status == 200
            assert "Chart.js v4" in (await r.text())[:200]


async def test_the_dashboard_is_not_on_the_public_listener(db_dsn: str, tmp_path: Path) -> None:
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        for path in ("/login", "/users", "/static/dashboard.js", "/live.json"):
            async with http.get(dashboard.proxy.url(path)) as r:
                assert r.status == 404, path
                assert "Sign in" not in await r.text()


async def test_sign_in_opens_a_session_in_an_httponly_strict_cookie(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_id, token = await make_admin_token(db_dsn, "ops")
    caplog.set_level(logging.INFO)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        async with http.get(dashboard.at("/login?next=/requests")) as r:
            nonce = csrf_in(await r.text())
        form = {"csrf": nonce, "token": token, "next": "/requests"}
        async with http.post(dashboard.at("/login"), data=form, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/requests"
            cookie = r.cookies["llama_gate_session"]
            assert cookie["httponly"] is True
            assert cookie["samesite"] == "Strict"
            assert cookie["path"] == "/"
        async with http.get(dashboard.at("/requests")) as r:
            assert r.status == 200
            page = await r.text()
            assert "Requests" in page
        # Signing out ends the session (an action: it needs the CSRF token too).
        async with http.post(dashboard.at("/logout"), data={"csrf": csrf_in(page)}) as r:
            assert r.url.path == "/login"
        async with http.get(dashboard.at("/users"), allow_redirects=False) as r:
            assert r.status == 303
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval(
            "SELECT last_used_at IS NOT NULL FROM admin_tokens WHERE token_id = $1", token_id
        )
    finally:
        await con.close()
    assert token not in caplog.text
    assert token[len("lga_") + 17 :] not in caplog.text  # the secret (it may hold "_" itself)
    assert token_id in caplog.text


async def test_a_wrong_or_revoked_token_or_a_stale_form_does_not_sign_in(
    db_dsn: str, tmp_path: Path
) -> None:
    token_id, token = await make_admin_token(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        async with http.get(dashboard.at("/login")) as r:
            nonce = csrf_in(await r.text())
        wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for presented in (wrong, "lga_nonsense", "", "x" * 5000, "lgk_" + token[4:]):
            form = {"csrf": nonce, "token": presented}
            async with http.post(dashboard.at("/login"), data=form) as r:
                assert r.status == 401, presented[:20]
                # Shaped like an API key, it is checked as one (a user's own page): no such key.
                told = "API key does not work" if presented.startswith("lgk_") else "admin token"
                assert told in await r.text()
        # The form's own token must match the browser's cookie (no sign-in forged elsewhere).
        async with http.post(dashboard.at("/login"), data={"csrf": "x" * 43, "token": token}) as r:
            assert r.status == 403
            assert "expired" in await r.text()
        con = await asyncpg.connect(db_dsn)
        try:
            await con.execute("UPDATE admin_tokens SET revoked_at = now() WHERE token_id = $1",
                              token_id)  # fmt: skip
        finally:
            await con.close()
        async with http.post(dashboard.at("/login"), data={"csrf": nonce, "token": token}) as r:
            assert r.status == 401


async def test_revoking_an_admin_token_ends_its_sessions(db_dsn: str, tmp_path: Path) -> None:
    token_id, token = await make_admin_token(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        await sign_in(http, dashboard, token)
        con = await asyncpg.connect(db_dsn)
        try:
            await con.execute("UPDATE admin_tokens SET revoked_at = now() WHERE token_id = $1",
                              token_id)  # fmt: skip
        finally:
            await con.close()
        async with http.get(dashboard.at("/users"), allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/login")


async def test_sign_in_attempts_are_rate_limited(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        async with http.get(dashboard.at("/login")) as r:
            nonce = csrf_in(await r.text())
        for _ in range(sessions_module.ATTEMPTS_PER_ADDRESS):
            form = {"csrf": nonce, "token": "lga_0123456789abcdef_" + "A" * 43}
            async with http.post(dashboard.at("/login"), data=form) as r:
                assert r.status == 401
        # Over the limit even the right token waits: guessing gets nowhere faster.
        async with http.post(dashboard.at("/login"), data={"csrf": nonce, "token": token}) as r:
            assert r.status == 429
            wait = int(r.headers["Retry-After"])
            assert 0 < wait <= sessions_module.ATTEMPT_WINDOW_SECONDS
            assert f"Try again in {wait} s" in await r.text()


async def test_an_action_without_its_csrf_token_is_refused(db_dsn: str, tmp_path: Path) -> None:
    await make_user(db_dsn, "alice")
    _, token = await make_admin_token(db_dsn)
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        csrf = await sign_in(http, dashboard, token)
        for form in ({}, {"csrf": ""}, {"csrf": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")}):
            async with http.post(dashboard.at("/users/alice/disable"), data=form) as r:
                assert r.status == 403
                assert "security token" in await r.text()
        # Another session's token is no good either.
        async with client() as other:
            other_csrf = await sign_in(other, dashboard, token)
        async with http.post(dashboard.at("/users/alice/disable"), data={"csrf": other_csrf}) as r:
            assert r.status == 403
        con = await asyncpg.connect(db_dsn)
        try:
            assert await con.fetchval("SELECT enabled FROM users WHERE username = 'alice'")
        finally:
            await con.close()
        async with http.post(dashboard.at("/users/alice/disable"), data={"csrf": csrf}) as r:
            assert r.status == 200
            assert "Disabled alice" in await r.text()


def test_sessions_end_when_idle_or_too_old() -> None:
    now = [0.0]
    sessions = sessions_module.Sessions(clock=lambda: now[0])
    cookie, session = sessions.open("t1")
    assert sessions.get(cookie) is session
    now[0] += sessions_module.IDLE_SECONDS - 1
    assert sessions.get(cookie) is session  # seen again: idle time starts over
    now[0] += sessions_module.IDLE_SECONDS + 1
    assert sessions.get(cookie) is None
    cookie, session = sessions.open("t1")
    for _ in range(int(sessions_module.LIFETIME_SECONDS // 3600) + 1):
        now[0] += 3600
        sessions.get(cookie)
    assert sessions.get(cookie) is None
    assert sessions.get(None) is None
    assert sessions.get("") is None


async def test_a_taken_dashboard_port_is_a_clear_error(db_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve the dashboard on 127\.0\.0\.1:{port}"):
            async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_DASHBOARD_PORT=str(port)):
                pass


OFF_SITE = (
    "//evil.example/x",
    "/\\evil.example",
    "/\t/evil.example/x",  # a tab: browsers drop it, and //evil.example is another site
    "https://evil.example/",
    "/a//b",
    "javascript:alert(1)",
)


async def test_next_is_a_path_of_the_dashboard_or_a_400(db_dsn: str, tmp_path: Path) -> None:
    _, token = await make_admin_token(db_dsn, "ops")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        for bad in (*OFF_SITE, "/users\r\nSet-Cookie: x=1", "/users\nX: y"):
            url = URL(dashboard.at("/login")).with_query(next=bad)
            async with http.get(url, allow_redirects=False) as r:
                assert r.status == 400, repr(bad)
                assert "must be a path of this dashboard" in await r.text()
        # As the issue's report typed it: the tab escaped in the query.
        raw = URL(dashboard.at("/login?next=/%09/evil.example:80/x"), encoded=True)
        async with http.get(raw, allow_redirects=False) as r:
            assert r.status == 400
        await sign_in(http, dashboard, token)
        # Signed in, /login sends the admin on: never off the dashboard, never a dropped
        # connection for a CR or LF (which would break the Location header).
        for bad in (*OFF_SITE, "/users\r\nSet-Cookie: x=1"):
            url = URL(dashboard.at("/login")).with_query(next=bad)
            async with http.get(url, allow_redirects=False) as r:
                assert r.status == 400, repr(bad)
                assert "Location" not in r.headers
        async with http.get(
            URL(dashboard.at("/login")).with_query(next="/requests?status=4xx"),
            allow_redirects=False,
        ) as r:
            assert (r.status, r.headers["Location"]) == (303, "/requests?status=4xx")
        # The sign-in form's own next field is checked the same way.
        async with http.post(
            dashboard.at("/login"), data={"csrf": "x", "token": token, "next": "//evil.example"}
        ) as r:
            assert r.status == 400


async def test_a_users_key_opens_their_own_page_and_nothing_of_an_admins(
    db_dsn: str, tmp_path: Path
) -> None:
    alice_id, alice = await make_user(db_dsn, "alice")
    await make_user(db_dsn, "bob")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        async with http.get(dashboard.at("/login")) as r:
            nonce = csrf_in(await r.text())
        form = {"csrf": nonce, "token": alice}
        async with http.post(dashboard.at("/login"), data=form, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/me"
        async with http.get(dashboard.at("/me")) as r:
            assert r.status == 200
            page = await r.text()
        assert "alice" in page
        assert "bob" not in page
        csrf = csrf_in(page)
        # Every admin page and action is refused, with or without the session's CSRF token.
        for path in ("/live", "/live.json", "/users", "/requests", "/requests.csv"):
            async with http.get(dashboard.at(path), allow_redirects=False) as r:
                assert r.status == 403, path
        actions = ("/users", "/users/bob/disable", "/users/alice/keys", "/users/alice/limits")
        for path in actions:
            form = {"csrf": csrf, "username": "mallory", "tokens_per_day": "1"}
            async with http.post(dashboard.at(path), data=form, allow_redirects=False) as r:
                assert r.status == 403, path
        con = await asyncpg.connect(db_dsn)
        try:
            assert await con.fetchval("SELECT count(*) FROM users") == 2  # no mallory
            assert await con.fetchval("SELECT count(*) FROM api_keys") == 2  # no new key
            # Revoking her key ends her session at its next request.
            await con.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", alice_id)
        finally:
            await con.close()
        async with http.get(dashboard.at("/me"), allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/login")
        async with http.get(dashboard.at("/login")) as r:
            nonce = csrf_in(await r.text())
        async with http.post(dashboard.at("/login"), data={"csrf": nonce, "token": alice}) as r:
            assert r.status == 401
            assert "API key does not work" in await r.text()


async def _user_session(http: aiohttp.ClientSession, dashboard: Dashboard, key: str) -> str:
    """Sign `http` in with a user's API key; the CSRF token of their page."""
    async with http.get(dashboard.at("/login")) as r:
        nonce = csrf_in(await r.text())
    async with http.post(dashboard.at("/login"), data={"csrf": nonce, "token": key}) as r:
        assert r.status == 200
        assert str(r.url).endswith("/me")
        return csrf_in(await r.text())


async def test_users_make_and_revoke_only_their_own_keys_when_allowed(
    db_dsn: str, tmp_path: Path
) -> None:
    _, alice = await make_user(db_dsn, "alice")
    _, bob = await make_user(db_dsn, "bob")
    async with (
        running_dashboard(db_dsn, tmp_path, LLAMA_PROXY_SELF_SERVICE_KEYS="1") as dashboard,
        client() as http,
    ):
        csrf = await _user_session(http, dashboard, alice)
        form = {"csrf": csrf, "label": "phone"}
        async with http.post(dashboard.at("/me/keys"), data=form) as r:
            assert r.status == 200
            shown = KEY_RE.findall(await r.text())
        assert len(set(shown)) == 1
        new = shown[0]
        async with http.get(dashboard.proxy.url("/v1/models"), headers=bearer(new)) as r:
            assert r.status == 200  # it works at once, with alice's access
        # Bob's key is not hers to revoke: not found, and it keeps working.
        bobs = bob.split("_")[1]
        async with http.post(dashboard.at(f"/me/keys/{bobs}/revoke"), data={"csrf": csrf}) as r:
            assert r.status == 404
        async with http.get(dashboard.proxy.url("/v1/models"), headers=bearer(bob)) as r:
            assert r.status == 200
        url = dashboard.at(f"/me/keys/{new.split('_')[1]}/revoke")
        async with http.post(url, data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/me"
        async with http.post(url, data={"csrf": "wrong" * 9}) as r:
            assert r.status == 403  # the session's CSRF token guards these actions too
    con = await asyncpg.connect(db_dsn)
    try:
        labels = await con.fetch(
            "SELECT label, revoked_at IS NOT NULL AS revoked FROM api_keys ORDER BY id"
        )
    finally:
        await con.close()
    assert [(r["label"], r["revoked"]) for r in labels] == [
        (None, False), (None, False), ("phone", True)
    ]  # fmt: skip


async def test_users_may_not_manage_keys_unless_allowed(db_dsn: str, tmp_path: Path) -> None:
    _, alice = await make_user(db_dsn, "alice")
    async with running_dashboard(db_dsn, tmp_path) as dashboard, client() as http:
        csrf = await _user_session(http, dashboard, alice)
        async with http.get(dashboard.at("/me")) as r:
            assert 'action="/me/keys"' not in await r.text()
        async with http.post(dashboard.at("/me/keys"), data={"csrf": csrf}) as r:
            assert r.status == 403
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM api_keys") == 1
    finally:
        await con.close()


async def test_a_key_with_limits_a_budget_or_an_expiry_of_its_own_manages_no_keys(
    db_dsn: str, tmp_path: Path
) -> None:
    alice_id, _ = await make_user(db_dsn, "alice")
    con = await asyncpg.connect(db_dsn)
    try:
        limited = await issue_key(con, alice_id, "limited", None)
        await set_key_limits(con, limited.key_id, {"rate_limit": 5, "rate_window_seconds": 60})
        budgeted = await issue_key(con, alice_id, "budgeted", None)
        await set_key_limits(con, budgeted.key_id, {"tokens_per_month": 1000})
        expiring = await issue_key(con, alice_id, "expiring", timedelta(days=1))
        plain = await issue_key(con, alice_id, "plain", None)
    finally:
        await con.close()
    async with running_dashboard(db_dsn, tmp_path, LLAMA_PROXY_SELF_SERVICE_KEYS="1") as dashboard:
        for key in (limited, budgeted, expiring):
            async with client() as http:
                csrf = await _user_session(http, dashboard, key.full.reveal())
                async with http.post(dashboard.at("/me/keys"), data={"csrf": csrf}) as r:
                    assert r.status == 403, key.key_id  # no key without the limits it has
                    assert "limits, a budget or an expiry of its own" in await r.text()
        async with client() as http:  # a key with the user's full access still may
            csrf = await _user_session(http, dashboard, plain.full.reveal())
            async with http.post(dashboard.at("/me/keys"), data={"csrf": csrf}) as r:
                assert r.status == 200
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM api_keys") == 6  # alice's, 4, the new one
    finally:
        await con.close()


async def test_a_key_limited_to_some_models_or_apis_manages_no_keys(
    db_dsn: str, tmp_path: Path
) -> None:
    alice_id, alice = await make_user(db_dsn, "alice")
    con = await asyncpg.connect(db_dsn)
    try:
        scoped = await issue_key(con, alice_id, "ci", None, None, ["embeddings"])
    finally:
        await con.close()
    async with (
        running_dashboard(db_dsn, tmp_path, LLAMA_PROXY_SELF_SERVICE_KEYS="1") as dashboard,
        client() as http,
    ):
        csrf = await _user_session(http, dashboard, scoped.full.reveal())
        async with http.get(dashboard.at("/me")) as r:
            assert 'action="/me/keys"' not in await r.text()
        async with http.post(dashboard.at("/me/keys"), data={"csrf": csrf}) as r:
            assert r.status == 403  # it must not mint a key with the user's full access
            assert "limited to some models or APIs" in await r.text()
        url = dashboard.at(f"/me/keys/{alice.split('_')[1]}/revoke")
        async with http.post(url, data={"csrf": csrf}) as r:
            assert r.status == 403  # nor revoke the user's full key
    con = await asyncpg.connect(db_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL") == 2
    finally:
        await con.close()
