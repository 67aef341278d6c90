"""`set-limit`, `list-users` and `usage` for the fair-sharing limits: concurrency, max_tokens
and token quotas, against a real Postgres (and, for the last test, a running proxy)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import asyncpg

from tests.cli_helpers import failure, invoke, new_key, ok
from tests.proxy_harness import running_proxy
from tests.sharing_helpers import chat
from tests.timed_upstream import TimedUpstream

LIMITS = ("max_concurrent", "max_tokens", "tokens_per_day", "tokens_per_minute")


def _user(env: dict[str, str], username: str) -> dict[str, object]:
    users = json.loads(ok(env, "list-users", "--json"))
    return next(u for u in users if u["username"] == username)


def _tokens_used(dsn: str, username: str, *tokens: int) -> None:
    async def run() -> None:
        con = await asyncpg.connect(dsn)
        try:
            user_id = await con.fetchval("SELECT id FROM users WHERE username = $1", username)
            for count in tokens:
                await con.execute(
                    """INSERT INTO llama_requests (user_id, username, path, status_code,
                           duration_ms, prompt_tokens, completion_tokens)
                       VALUES ($1, $2, '/v1/chat/completions', 200, 5, $3, 0)""",
                    user_id,
                    username,
                    count,
                )
        finally:
            await con.close()

    asyncio.run(run())


def test_set_limit_sets_each_override_and_keeps_the_others(cli_env: dict[str, str]) -> None:
    new_key(cli_env, "frank")
    output = ok(cli_env, "set-limit", "--username", "frank", "--max-concurrent", "2")
    assert "frank: at most 60 requests per 60 s, 2 at once (in flight or queued)" in output
    assert "max_tokens 1024, no token quota" in output
    output = ok(
        cli_env, "set-limit", "--username", "frank", "--max-tokens", "256",
        "--tokens-per-day", "100000", "--tokens-per-minute", "5000", "--rate-limit", "9",
    )  # fmt: skip
    assert "at most 9 requests per 60 s, 2 at once" in output  # max_concurrent was kept
    assert "max_tokens 256, token quota 100000 per day (UTC) and 5000 per minute" in output
    user = _user(cli_env, "frank")
    assert [user[name] for name in LIMITS] == [2, 256, 100000, 5000]
    assert user["rate_limit"] == 9
    table = ok(cli_env, "list-users")
    assert "MAX_CONCURRENT" in table
    assert "TOKENS_PER_DAY" in table
    assert "100000" in table


def test_default_drops_one_override_and_the_flag_drops_all(cli_env: dict[str, str]) -> None:
    new_key(cli_env, "gina")
    ok(
        cli_env, "set-limit", "--username", "gina", "--max-concurrent", "3",
        "--tokens-per-day", "500", "--window", "30",
    )  # fmt: skip
    output = ok(cli_env, "set-limit", "--username", "gina", "--tokens-per-day", "none")
    assert "no token quota" in output
    assert [_user(cli_env, "gina")[name] for name in LIMITS] == [3, None, None, None]
    ok(cli_env, "set-limit", "--username", "gina", "--max-concurrent", "default")
    assert _user(cli_env, "gina")["max_concurrent"] is None
    assert _user(cli_env, "gina")["rate_window_seconds"] == 30
    ok(cli_env, "set-limit", "--username", "gina", "--tokens-per-minute", "40")
    ok(cli_env, "set-limit", "--username", "gina", "--default")
    user = _user(cli_env, "gina")
    assert [user[name] for name in (*LIMITS, "rate_limit", "rate_window_seconds")] == [None] * 6


def test_set_limit_refuses_bad_input_in_one_line(cli_env: dict[str, str]) -> None:
    new_key(cli_env, "hank")
    for option in ("--max-concurrent", "--max-tokens", "--tokens-per-day", "--tokens-per-minute"):
        for bad in ("0", "-3", "lots"):
            result = invoke(cli_env, "set-limit", "--username", "hank", option, bad)
            assert result.exit_code == 2, (option, bad, result.output)
            assert "neither a whole number above 0 nor 'default'" in result.output
    combined = invoke(cli_env, "set-limit", "--username", "hank", "--default", "--max-tokens", "5")
    assert combined.exit_code == 2
    assert "--default cannot be combined" in combined.output
    assert invoke(cli_env, "set-limit", "--username", "hank").exit_code == 2
    assert "no user named 'ghost'" in failure(
        cli_env, "set-limit", "--username", "ghost", "--tokens-per-day", "5"
    )


def test_limits_past_what_the_database_holds_are_refused_where_they_are_set(
    cli_env: dict[str, str],
) -> None:
    new_key(cli_env, "ivan")
    too_much = {
        "--rate-limit": "99999999999",
        "--window": "99999999999",  # its milliseconds would overflow the rate limiter's SQL
        "--max-concurrent": "2147483648",
        "--max-tokens": "2147483648",
        "--tokens-per-day": "2147483648",
        "--tokens-per-minute": "99999999999999999999",
    }
    for option, value in too_much.items():
        result = invoke(cli_env, "set-limit", "--username", "ivan", option, value)
        assert result.exit_code == 2, (option, result.output)
        assert "more than this limit can be: at most" in result.output, result.output
        assert "Traceback" not in result.output
    for option in ("--rate-limit", "--window"):
        result = invoke(cli_env, "create-user", "--username", "jack", option, "99999999999")
        assert result.exit_code == 2, (option, result.output)
    user = _user(cli_env, "ivan")
    assert [user[name] for name in (*LIMITS, "rate_limit", "rate_window_seconds")] == [None] * 6
    # The largest values allowed are stored and shown.
    ok(cli_env, "set-limit", "--username", "ivan", "--tokens-per-day", "2147483647")
    assert _user(cli_env, "ivan")["tokens_per_day"] == 2147483647


def test_set_limit_help_says_what_each_option_does(cli_env: dict[str, str]) -> None:
    text = " ".join(ok(cli_env, "set-limit", "--help").split())
    assert "in flight or queued at once" in text
    assert "Cap on one request's max_tokens" in text
    assert "per UTC day; 'none' removes it" in text
    assert "per rolling minute" in text
    assert "Example:" in text


def test_usage_shows_tokens_today_against_each_quota(cli_env: dict[str, str], db_dsn: str) -> None:
    for name in ("ivy", "jack", "kim"):
        new_key(cli_env, name)
    ok(cli_env, "set-limit", "--username", "ivy", "--tokens-per-day", "1000")
    ok(cli_env, "set-limit", "--username", "jack", "--tokens-per-minute", "50")
    _tokens_used(db_dsn, "ivy", 300, 20)
    _tokens_used(db_dsn, "kim", 7)
    table = ok(cli_env, "usage")
    assert "Token quotas, today" in table
    quota_lines = table.split("Token quotas, today", 1)[1].splitlines()
    assert any(line.split()[:3] == ["ivy", "320", "1000"] for line in quota_lines), table
    assert any(line.split()[:5] == ["jack", "0", "-", "0", "50"] for line in quota_lines), table
    assert not any(line.startswith("kim") for line in quota_lines)  # no quota, not listed
    rows = json.loads(ok(cli_env, "usage", "--quotas", "--json"))
    assert [(r["username"], r["tokens_today"], r["tokens_last_minute"]) for r in rows] == [
        ("ivy", 320, 320),
        ("jack", 0, 0),
    ]
    kim = json.loads(ok(cli_env, "usage", "--quotas", "--user", "kim", "--json"))
    assert kim == [
        {"username": "kim", "tokens_per_day": None, "tokens_today": 7,
         "tokens_per_minute": None, "tokens_last_minute": 7}
    ]  # fmt: skip
    only = ok(cli_env, "usage", "--quotas")
    assert only.startswith("USERNAME  TOKENS_TODAY")  # the daily view is left out
    assert "P50_MS" not in only


async def test_a_running_proxy_applies_a_new_quota_within_a_second(
    cli_env: dict[str, str], db_dsn: str, tmp_path: Path
) -> None:
    upstream = TimedUpstream(service_time=0.0)  # 7 tokens per answer
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:  # type: ignore[arg-type]
        key = await proxy.user("lena")
        url = proxy.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as client:
            assert (await chat(client, url, key, "lena"))[0] == 200
            await proxy.wait_for_records(1)
            await asyncio.to_thread(
                ok, cli_env, "set-limit", "--username", "lena", "--tokens-per-minute", "5"
            )
            # The change reaches the proxy as a NOTIFY; its audit row, within the audit flush.
            statuses: list[int] = []
            deadline = asyncio.get_running_loop().time() + 1.0
            while not statuses or statuses[-1] != 429:
                assert asyncio.get_running_loop().time() < deadline, statuses
                statuses.append((await chat(client, url, key, "lena"))[0])
                await asyncio.sleep(0.05)
    assert set(statuses[:-1]) <= {200}
