"""The admin CLI against a real Postgres: happy paths and every error case, each one clear line."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from proxy.auth.apikeys import KeyHasher, parse_key
from proxy.cli.main import cli
from proxy.db.localpg import free_port
from tests.cli_helpers import KEY_RE, failure, invoke, new_key, ok


def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    return asyncio.run(run())


def test_init_db_on_fresh_database_then_create_user_stores_only_a_hash(
    empty_dsn: str, tmp_path: Path
) -> None:
    env = {"POSTGRES_AUTH_DSN": empty_dsn, "LLAMA_GATE_HOME": str(tmp_path)}
    assert "newest schema" in ok(env, "init-db")
    assert "newest schema" in ok(env, "init-db")  # idempotent
    output = ok(env, "create-user", "--username", "alice")
    keys = KEY_RE.findall(output)
    assert len(set(keys)) == 1
    assert "curl http://localhost:8001/v1/chat/completions" in output
    key_id, secret = parse_key(keys[0]) or ("", "")
    rows = _fetch(empty_dsn, "SELECT * FROM api_keys")
    assert len(rows) == 1
    assert rows[0]["key_id"] == key_id
    assert KeyHasher().verify(rows[0]["secret_hash"], secret)
    # Neither the full key nor its secret is anywhere in the database dump.
    dump = subprocess.run(
        ["pg_dump", "--data-only", empty_dsn], capture_output=True, text=True, check=True
    ).stdout
    assert secret not in dump
    assert keys[0] not in dump
    assert key_id in dump


def test_init_db_creates_a_missing_database(postgres_server_dsn: str, tmp_path: Path) -> None:
    name = f"llama_gate_created_{tmp_path.name[-8:].lower().replace('-', '_')}"
    dsn = postgres_server_dsn.rsplit("/", 1)[0] + f"/{name}"
    env = {"POSTGRES_AUTH_DSN": dsn, "LLAMA_GATE_HOME": str(tmp_path)}
    try:
        output = ok(env, "init-db")
        assert "Created database" in output
        assert _fetch(dsn, "SELECT count(*) AS n FROM users")[0]["n"] == 0
    finally:
        _fetch(postgres_server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_create_user_with_limits_and_case_insensitive_names(cli_env: dict[str, str]) -> None:
    output = ok(
        cli_env, "create-user", "--username", "Bob.Smith", "--rate-limit", "5", "--window", "10"
    )
    assert "Created user bob.smith (at most 5 requests per 10 s)" in output
    users = json.loads(ok(cli_env, "list-users", "--json"))
    assert [(u["username"], u["rate_limit"], u["rate_window_seconds"]) for u in users] == [
        ("bob.smith", 5, 10)
    ]
    assert users[0]["active_keys"] == 1
    err = failure(cli_env, "create-user", "--username", "BOB.SMITH")
    assert "already exists" in err


@pytest.mark.parametrize("bad", ["", "al ice", "a" * 65, "alice!", "ålice", "al/ice"])
def test_bad_username_is_refused(cli_env: dict[str, str], bad: str) -> None:
    err = failure(cli_env, "create-user", "--username", bad)
    assert "not a valid username" in err


@pytest.mark.parametrize(
    "command",
    [
        ["disable-user", "--username", "ghost"],
        ["enable-user", "--username", "ghost"],
        ["delete-user", "--username", "ghost", "--yes"],
        ["create-key", "--username", "ghost"],
        ["set-limit", "--username", "ghost", "--rate-limit", "3"],
    ],
)
def test_unknown_user_is_one_clear_line(cli_env: dict[str, str], command: list[str]) -> None:
    assert "no user named 'ghost'" in failure(cli_env, *command)


@pytest.mark.parametrize("command", ["revoke-key", "rotate-key"])
def test_unknown_key_id(cli_env: dict[str, str], command: str) -> None:
    assert "no key with id '0123456789abcdef'" in failure(cli_env, command, "0123456789abcdef")
    assert "is not a key id" in failure(cli_env, command, "not-a-key")


def test_database_unreachable_is_one_line_without_password(tmp_path: Path) -> None:
    env = {
        "POSTGRES_AUTH_HOST": "127.0.0.1",
        "POSTGRES_AUTH_PORT": str(free_port()),  # nothing listens there
        "POSTGRES_AUTH_PASSWORD": "sup3r-s3cret-pw",
        "LLAMA_GATE_HOME": str(tmp_path),
    }
    for command in (["init-db"], ["list-users"], ["create-user", "--username", "alice"]):
        err = failure(env, *command)
        assert "cannot reach Postgres" in err
        assert "sup3r-s3cret-pw" not in err
        assert "postgres:***@127.0.0.1" in err


def test_missing_schema_says_run_init_db(empty_dsn: str, tmp_path: Path) -> None:
    env = {"POSTGRES_AUTH_DSN": empty_dsn, "LLAMA_GATE_HOME": str(tmp_path)}
    assert "run `llama-gate init-db` first" in failure(env, "list-users")


def test_bad_setting_is_one_line(cli_env: dict[str, str]) -> None:
    err = failure({**cli_env, "LLAMA_PROXY_PORT": "http"}, "create-user", "--username", "x")
    assert "LLAMA_PROXY_PORT='http' from environment" in err


def test_disable_enable_delete_keep_audit_username(cli_env: dict[str, str], db_dsn: str) -> None:
    new_key(cli_env, "carol")
    ok(cli_env, "disable-user", "--username", "carol")
    assert json.loads(ok(cli_env, "list-users", "--json"))[0]["enabled"] is False
    ok(cli_env, "enable-user", "--username", "carol")
    assert json.loads(ok(cli_env, "list-users", "--json"))[0]["enabled"] is True
    user_id = _fetch(db_dsn, "SELECT id FROM users WHERE username = 'carol'")[0]["id"]
    _fetch(
        db_dsn,
        """INSERT INTO llama_requests (user_id, username, path, status_code, duration_ms)
           VALUES ($1, 'carol', '/v1/models', 200, 3.5)""",
        user_id,
    )
    assert invoke(cli_env, "delete-user", "--username", "carol", input="n\n").exit_code != 0
    ok(cli_env, "delete-user", "--username", "carol", "--yes")
    assert json.loads(ok(cli_env, "list-users", "--json")) == []
    assert _fetch(db_dsn, "SELECT count(*) AS n FROM api_keys")[0]["n"] == 0
    # The row stays as written: user ids are never reused, and the username says who it was.
    row = _fetch(db_dsn, "SELECT user_id, username FROM llama_requests")[0]
    assert (row["user_id"], row["username"]) == (user_id, "carol")


def test_keys_create_list_revoke(cli_env: dict[str, str], db_dsn: str) -> None:
    first = new_key(cli_env, "dave")
    output = ok(
        cli_env, "create-key", "--username", "dave", "--label", "laptop", "--expires-in", "30d"
    )
    second = KEY_RE.findall(output)[0]
    keys = json.loads(ok(cli_env, "list-keys", "--username", "dave", "--json"))
    assert [k["state"] for k in keys] == ["active", "active"]
    assert keys[1]["label"] == "laptop"
    expires = datetime.fromisoformat(keys[1]["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    table = ok(cli_env, "list-keys")
    for full in (first, second):
        assert full not in table
        assert (parse_key(full) or ("",))[0] in table
    key_id = (parse_key(first) or ("",))[0]
    assert f"Revoked key {key_id}" in ok(cli_env, "revoke-key", f"lgk_{key_id}")
    assert "already revoked" in ok(cli_env, "revoke-key", key_id)
    states = [k["state"] for k in json.loads(ok(cli_env, "list-keys", "--json"))]
    assert sorted(states) == ["active", "revoked"]
    assert "already revoked" in failure(cli_env, "rotate-key", key_id)


def test_rotate_key_now_and_with_grace(cli_env: dict[str, str], db_dsn: str) -> None:
    old = new_key(cli_env, "erin")
    old_id = (parse_key(old) or ("",))[0]
    output = ok(cli_env, "rotate-key", old_id, "--grace", "1h")
    new = KEY_RE.findall(output)[0]
    assert new != old
    assert "stops working in 1:00:00" in output
    by_id = {k["key_id"]: k for k in json.loads(ok(cli_env, "list-keys", "--json"))}
    assert by_id[old_id]["state"] == "retiring"
    revoked_at = datetime.fromisoformat(by_id[old_id]["revoked_at"])
    assert timedelta(minutes=59) < revoked_at - datetime.now(UTC) <= timedelta(hours=1)
    new_id = (parse_key(new) or ("",))[0]
    assert by_id[new_id]["state"] == "active"
    ok(cli_env, "rotate-key", new_id)
    states = {k["key_id"]: k["state"] for k in json.loads(ok(cli_env, "list-keys", "--json"))}
    assert states[new_id] == "revoked"
    assert list(states.values()).count("active") == 1


def test_set_limit(cli_env: dict[str, str]) -> None:
    new_key(cli_env, "frank")
    assert "at most 7 requests per 60 s" in ok(
        cli_env, "set-limit", "--username", "frank", "--rate-limit", "7"
    )
    user = json.loads(ok(cli_env, "list-users", "--json"))[0]
    assert (user["rate_limit"], user["rate_window_seconds"]) == (7, None)
    ok(cli_env, "set-limit", "--username", "frank", "--default")
    user = json.loads(ok(cli_env, "list-users", "--json"))[0]
    assert (user["rate_limit"], user["rate_window_seconds"]) == (None, None)
    assert invoke(cli_env, "set-limit", "--username", "frank").exit_code == 2
    assert invoke(cli_env, "set-limit", "--username", "frank", "--rate-limit", "0").exit_code == 2


def _insert_requests(dsn: str, rows: list[tuple[str | None, int, float, int, int, str]]) -> None:
    for username, status, duration, prompt, completion, age in rows:
        _fetch(
            dsn,
            """INSERT INTO llama_requests (username, path, status_code, duration_ms,
                   prompt_tokens, completion_tokens, request_bytes, response_bytes, created_at)
               VALUES ($1, '/v1/chat/completions', $2, $3, $4, $5, 100, 1000,
                       now() - $6::interval)""",
            username,
            status,
            duration,
            prompt,
            completion,
            timedelta(days=int(age)),
        )


def test_usage_reads_the_daily_view(cli_env: dict[str, str], db_dsn: str) -> None:
    _insert_requests(
        db_dsn,
        [
            ("alice", 200, 10.0, 5, 7, "0"),
            ("alice", 200, 30.0, 5, 9, "0"),
            ("alice", 429, 1.0, 0, 0, "0"),
            ("bob", 200, 50.0, 1, 1, "0"),
            (None, 401, 0.5, 0, 0, "0"),
            ("alice", 200, 99.0, 1, 1, "40"),
        ],
    )
    rows = json.loads(ok(cli_env, "usage", "--json"))
    alice = next(r for r in rows if r["username"] == "alice")
    assert (alice["requests"], alice["errors"]) == (3, 1)
    assert (alice["prompt_tokens"], alice["completion_tokens"]) == (10, 16)
    assert (alice["bytes_in"], alice["bytes_out"]) == (300, 3000)
    assert alice["p50_ms"] == 10.0
    assert {r["username"] for r in rows} == {"alice", "bob", None}
    assert [r["username"] for r in json.loads(ok(cli_env, "usage", "--user", "bob", "--json"))] == [
        "bob"
    ]
    assert len(json.loads(ok(cli_env, "usage", "--since", "60d", "--json"))) == 4
    table = ok(cli_env, "usage")
    assert "PROMPT_TOKENS" in table
    assert "alice" in table
    assert invoke(cli_env, "usage", "--since", "yesterday").exit_code == 2


def test_prune_logs_in_batches(cli_env: dict[str, str], db_dsn: str) -> None:
    _insert_requests(db_dsn, [("a", 200, 1.0, 0, 0, "100")] * 7 + [("a", 200, 1.0, 0, 0, "1")] * 2)
    _fetch(
        db_dsn,
        """INSERT INTO llama_audit_batches (batch_id, written_at, row_count)
           VALUES (gen_random_uuid(), now() - interval '100 days', 7),
                  (gen_random_uuid(), now() - interval '1 day', 2) RETURNING 1""",
    )
    output = ok(cli_env, "prune-logs", "--older-than", "90d", "--batch-size", "3")
    assert "Deleted 7 llama_requests rows, 1 audit batch ids and 0 llama_unauthenticated" in output
    assert _fetch(db_dsn, "SELECT count(*) AS n FROM llama_requests")[0]["n"] == 2
    # The batch ids that guarded the deleted rows went with them; the recent one stays.
    kept = _fetch(db_dsn, "SELECT row_count FROM llama_audit_batches")
    assert [row["row_count"] for row in kept] == [2]
    assert invoke(cli_env, "prune-logs", "--older-than", "ninety").exit_code == 2


def test_prune_logs_deletes_stored_responses_past_their_retention(
    cli_env: dict[str, str], db_dsn: str
) -> None:
    ok(cli_env, "create-user", "--username", "alice")
    _fetch(
        db_dsn,
        """INSERT INTO llama_responses (id, user_id, expires_at, input_items, messages, response)
           SELECT r.id, u.id, now() + r.ttl, '[]', '[]', '{}' FROM users u,
                  (VALUES ('resp_old', interval '-1 minute'), ('resp_new', interval '1 day'))
                  AS r(id, ttl) RETURNING 1""",
    )
    output = ok(cli_env, "prune-logs", "--older-than", "90d")
    assert "and 1 stored responses past LLAMA_PROXY_RESPONSES_RETENTION" in output
    kept = _fetch(db_dsn, "SELECT id FROM llama_responses")
    assert [row["id"] for row in kept] == ["resp_new"]


def test_every_command_has_help_with_an_example(cli_env: dict[str, str]) -> None:
    for name in cli.commands:
        text = ok(cli_env, name, "--help")
        assert "Example:" in text, name
        assert "llama-gate" in text, name
