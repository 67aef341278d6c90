"""The CLI's admin tokens (the dashboard's sign-in) and `usage --totals` (what it charts)."""

from __future__ import annotations

import asyncio
import json
import re

import asyncpg

from tests.cli_helpers import failure, ok

TOKEN_RE = re.compile(r"lga_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetch(query)
        finally:
            await con.close()

    return asyncio.run(run())


def test_an_admin_token_is_shown_once_and_stored_hashed(
    cli_env: dict[str, str], db_dsn: str
) -> None:
    env = {**cli_env, "LLAMA_PROXY_DASHBOARD_PORT": "9102"}
    output = ok(env, "create-admin-token", "--label", "alice")
    match = TOKEN_RE.search(output)
    assert match, output
    token_id, secret = match.groups()
    assert "shown only this once" in output
    assert "http://127.0.0.1:9102/" in output
    assert "ssh -N -L 9102:127.0.0.1:9102" in output
    [row] = _fetch(db_dsn, "SELECT token_id, secret_hash, label FROM admin_tokens")
    assert (row["token_id"], row["label"]) == (token_id, "alice")
    assert row["secret_hash"].startswith("$argon2id$")
    assert secret not in row["secret_hash"]

    listed = ok(cli_env, "list-admin-tokens")
    assert token_id in listed
    assert secret not in listed
    [shown] = json.loads(ok(cli_env, "list-admin-tokens", "--json"))
    assert (shown["token_id"], shown["state"]) == (token_id, "active")
    assert "secret_hash" not in shown

    revoked = ok(cli_env, "revoke-admin-token", f"lga_{token_id}")
    assert f"Revoked admin token {token_id}." in revoked
    assert "already revoked" in ok(cli_env, "revoke-admin-token", token_id)
    assert json.loads(ok(cli_env, "list-admin-tokens", "--json"))[0]["state"] == "revoked"
    assert "no admin token with id" in failure(cli_env, "revoke-admin-token", "0" * 16)
    assert "is not a token id" in failure(cli_env, "revoke-admin-token", "nope")


def test_create_admin_token_says_when_the_dashboard_is_off(cli_env: dict[str, str]) -> None:
    output = ok({**cli_env, "LLAMA_PROXY_DASHBOARD_PORT": "0"}, "create-admin-token")
    assert TOKEN_RE.search(output)
    assert "The dashboard is off: set LLAMA_PROXY_DASHBOARD_PORT" in output


def test_usage_totals_are_one_row_per_day_for_everyone(
    cli_env: dict[str, str], db_dsn: str
) -> None:
    _fetch(
        db_dsn,
        """INSERT INTO llama_requests (username, path, status_code, duration_ms, ttfb_ms,
                                       prompt_tokens, completion_tokens, created_at)
           VALUES ('alice', '/v1/chat/completions', 200, 100, 10, 5, 7, now()),
                  ('bob', '/v1/chat/completions', 200, 300, 30, 1, 1, now()),
                  ('bob', '/v1/chat/completions', 503, 1, NULL, 0, 0, now()),
                  ('alice', '/v1/chat/completions', 200, 50, 5, 2, 2, now() - interval '3 days')""",
    )
    rows = json.loads(ok(cli_env, "usage", "--totals", "--json"))
    assert len(rows) == 2
    today = rows[0]
    assert (today["requests"], today["errors"]) == (3, 1)
    assert (today["prompt_tokens"], today["completion_tokens"]) == (6, 8)
    assert today["p50_ms"] == 100.0
    assert (today["ttfb_p50_ms"], today["ttfb_p95_ms"]) == (20.0, 29.0)
    assert today["cached_tokens"] == 0
    table = ok(cli_env, "usage", "--totals")
    assert "TTFB_P95_MS" in table
    assert "USERNAME" not in table
    assert "leave out --user" in failure(cli_env, "usage", "--totals", "--user", "alice")
    # The prompt tokens the backend's cache served are summed too.
    _fetch(db_dsn, "UPDATE llama_requests SET cached_tokens = 3 WHERE username = 'alice'")
    rows = json.loads(ok(cli_env, "usage", "--totals", "--json"))
    assert [row["cached_tokens"] for row in rows] == [3, 3]
    assert "CACHED_TOKENS" in ok(cli_env, "usage", "--totals")
