"""Every admin CLI error is one line on stderr with a non-zero exit: click's own usage errors,
durations and numbers past what Python or Postgres hold, and usernames that read as options.
`prune-logs` never empties the audit log without asking."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from proxy.cli.main import cli
from proxy.db import migrate
from tests.cli_helpers import failure, invoke, new_key, ok

LLAMA_GATE = Path(sys.executable).parent / "llama-gate"


def _fetchval(dsn: str, sql: str, *args: object) -> object:
    async def run() -> object:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetchval(sql, *args)
        finally:
            await con.close()

    return asyncio.run(run())


def _add_requests(dsn: str, *ages: timedelta) -> None:
    for age in ages:
        _fetchval(
            dsn,
            """INSERT INTO llama_requests (username, path, status_code, duration_ms, created_at)
               VALUES ('a', '/v1/chat/completions', 200, 1, now() - $1::interval)""",
            age,
        )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["usage", "--since", "99999999d"], "'99999999d' is too long: at most 36500d"),
        (["prune-logs", "--older-than", "99999999d"], "is too long"),
        (["create-user", "--username", "a", "--expires-in", "99999999w"], "is too long"),
        (["create-key", "--username", "a", "--expires-in", "99999999w"], "is too long"),
        (["rotate-key", "0123456789abcdef", "--grace", "99999999w"], "is too long"),
        (["create-user", "--username", "a", "--expires-in", "0d"], "is no time at all"),
        (["serve", "--port", "99999"], "99999 is not in the range 1<=x<=65535"),
        (["serve", "--port", "http"], "'http' is not a valid integer"),
        (["create-user", "--username", "a", "--rate-limit", "99999999999"], "1<=x<=1000000"),
        (["create-user", "--username", "a", "--window", "99999999999"], "1<=x<=604800"),
        (["set-limit", "--username", "a", "--tokens-per-day", "99999999999"], "at most"),
        (["set-limit", "--username", "a", "--max-tokens", "-1"], "neither a whole number"),
        (["prune-logs", "--older-than", "90d", "--batch-size", "1" + "0" * 20], "1<=x<=1000000"),
        (["create-user"], "Missing option '--username'"),
        (["create-user", "--username"], "'--username' requires an argument"),
        (["create-user", "--username", "a", "--bogus"], "No such option '--bogus'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["set-limit", "--username", "a"], "give at least one limit"),
        (["usage", "--since", "yesterday"], "neither a date"),
        (["revoke-key"], "Missing argument 'KEY_ID'"),
    ],
)
def test_each_error_is_one_line(cli_env: dict[str, str], args: list[str], says: str) -> None:
    assert says in failure(cli_env, *args)


def test_usage_errors_keep_clicks_exit_status_and_name_the_help(cli_env: dict[str, str]) -> None:
    result = invoke(cli_env, "create-user", "--username", "a", "--bogus")
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("create-user --help")


def test_help_is_as_it_was(cli_env: dict[str, str]) -> None:
    result = invoke(cli_env, "create-user", "--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")
    assert "create-user [OPTIONS]" in result.output.splitlines()[0]
    assert "Example:" in result.output
    assert result.stderr == ""


def test_a_real_shell_sees_one_line_too(db_dsn: str, tmp_path: Path) -> None:
    """The installed `llama-gate` script, with its own logging set up, as a user runs it."""
    env = {**os.environ, "POSTGRES_AUTH_DSN": db_dsn, "LLAMA_GATE_HOME": str(tmp_path)}
    for args in (["usage", "--since", "99999999d"], ["create-user", "--username", "--help"]):
        result = subprocess.run(
            [str(LLAMA_GATE), *args], env=env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("Error: Invalid value for")


@pytest.mark.parametrize("bad", ["--help", "-", "...", ".alice", "_alice", "-alice"])
def test_usernames_start_with_a_letter_or_digit(cli_env: dict[str, str], bad: str) -> None:
    err = failure(cli_env, "create-user", "--username", bad)
    assert "not a valid username" in err
    assert "starting with a letter or digit" in err
    assert _fetchval(cli_env["POSTGRES_AUTH_DSN"], "SELECT count(*) FROM users") == 0


def test_good_usernames_still_work(cli_env: dict[str, str]) -> None:
    for name in ("alice", "0day", "a", "b.smith-2_x", "z" * 64):
        new_key(cli_env, name)


@pytest.mark.parametrize("bad", ["--help", "-", "...", "_x"])
def test_the_database_refuses_them_as_well(db_dsn: str, bad: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        _fetchval(db_dsn, "INSERT INTO users (username) VALUES ($1)", bad)


def test_the_migration_names_existing_bad_usernames_instead_of_failing_obscurely(
    empty_dsn: str,
) -> None:
    migrate.upgrade(empty_dsn, "0006")
    _fetchval(empty_dsn, "INSERT INTO users (username) VALUES ('--help'), ('ok')")
    with pytest.raises(RuntimeError, match=r"1 username\(s\) do not start .*'--help'"):
        migrate.upgrade(empty_dsn, "0010")
    _fetchval(empty_dsn, "UPDATE users SET username = 'help' WHERE username = '--help'")
    migrate.upgrade(empty_dsn, "0010")
    with pytest.raises(asyncpg.CheckViolationError):
        _fetchval(empty_dsn, "INSERT INTO users (username) VALUES ('-')")
    migrate.downgrade(empty_dsn, "0006")
    _fetchval(empty_dsn, "INSERT INTO users (username) VALUES ('-')")


def test_prune_logs_with_a_recent_cutoff_refuses_without_a_terminal(
    cli_env: dict[str, str], db_dsn: str
) -> None:
    _add_requests(db_dsn, timedelta(0), timedelta(hours=2), timedelta(days=100))
    for cutoff in ("0d", "0s", "1h", "23h"):
        err = failure(cli_env, "prune-logs", "--older-than", cutoff, input="y\n")
        assert "add --yes" in err
    assert _fetchval(db_dsn, "SELECT count(*) FROM llama_requests") == 3
    assert "Deleted 1 llama_requests rows" in ok(cli_env, "prune-logs", "--older-than", "1d")
    assert "Deleted 1 llama_requests rows" in ok(
        cli_env, "prune-logs", "--older-than", "1h", "--yes"
    )
    assert "Deleted 1 llama_requests rows" in ok(
        cli_env, "prune-logs", "--older-than", "0d", "--yes"
    )
    assert _fetchval(db_dsn, "SELECT count(*) FROM llama_requests") == 0


def _on_a_terminal(env: dict[str, str], args: list[str], answer: bytes) -> tuple[int, str]:
    """Run the real `llama-gate` with a pseudo-terminal as its stdin, answering its question."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [str(LLAMA_GATE), *args], env={**os.environ, **env}, stdin=follower,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.write(leader, answer)
        out, err = process.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return process.returncode, (out + err).decode()


def test_prune_logs_with_a_recent_cutoff_asks_on_a_terminal(
    cli_env: dict[str, str], db_dsn: str
) -> None:
    _add_requests(db_dsn, timedelta(0), timedelta(days=100))
    code, text = _on_a_terminal(cli_env, ["prune-logs", "--older-than", "0d"], b"n\n")
    assert code == 1, text
    assert "deletes every audit row" in text
    assert "Delete them? [y/N]" in text
    assert "Error: nothing deleted" in text
    assert _fetchval(db_dsn, "SELECT count(*) FROM llama_requests") == 2
    code, text = _on_a_terminal(cli_env, ["prune-logs", "--older-than", "0d"], b"y\n")
    assert code == 0, text
    assert "Deleted 2 llama_requests rows" in text
    assert _fetchval(db_dsn, "SELECT count(*) FROM llama_requests") == 0


def test_every_command_with_a_username_checks_it(cli_env: dict[str, str]) -> None:
    for name, command in cli.commands.items():
        if any(param.name == "username" for param in command.params):
            extra = ["--rate-limit", "3"] if name == "set-limit" else []
            flag = "--user" if name == "usage" else "--username"
            assert "not a valid username" in failure(cli_env, name, flag, "-", *extra), name
