"""The shell entry points, run for real as a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from proxy.auth.apikeys import KeyHasher, parse_key
from proxy.db.localpg import find_bindir
from tests.cli_helpers import KEY_RE

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, timeout=120, check=False
    )


def test_user_management_script_creates_a_user_seen_by_psql(db_dsn: str) -> None:
    env = {"POSTGRES_AUTH_DSN": db_dsn}
    script = str(ROOT / "bin" / "user_management_cli.sh")
    created = _run(script, "create-user", "--username", "Zed", env=env)
    assert created.returncode == 0, created.stderr
    key = KEY_RE.search(created.stdout)
    assert key, created.stdout
    key_id, secret = parse_key(key.group(0)) or ("", "")

    psql = str(find_bindir() / "psql")
    query = (
        "SELECT u.username, k.key_id, k.secret_hash"
        " FROM users u JOIN api_keys k ON k.user_id = u.id"
    )
    rows = _run(psql, "-At", "-F", " ", "-d", db_dsn, "-c", query, env={})
    assert rows.returncode == 0, rows.stderr
    username, stored_id, secret_hash = rows.stdout.split()
    assert (username, stored_id) == ("zed", key_id)
    assert KeyHasher().verify(secret_hash, secret)

    duplicate = _run(script, "create-user", "--username", "zed", env=env)
    assert duplicate.returncode == 1
    assert duplicate.stderr.strip().splitlines() == [
        "Error: user 'zed' already exists; give them another key with "
        "`llama-gate create-key --username zed`"
    ]


def test_user_management_script_help_lists_every_command() -> None:
    result = _run(str(ROOT / "bin" / "user_management_cli.sh"), "--help", env={})
    assert result.returncode == 0, result.stderr
    for command in ("init-db", "create-user", "list-users", "rotate-key", "usage", "prune-logs"):
        assert command in result.stdout
