"""DSNs in libpq's keyword spelling work, and no password reaches a message in either spelling."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from proxy.dsn import as_url, mask_passwords, redact_dsn
from proxy.settings import SettingsError, load_settings
from tests.cli_helpers import failure, ok

SECRET = "kw-s3cret"


def keyword_dsn(url: str, password: str = SECRET) -> str:
    """The test database's URL in libpq's keyword spelling, with a password (trust ignores it)."""
    parts = urlsplit(url)
    return (
        f"host={parts.hostname} port={parts.port} user={parts.username} "
        f"password={password} dbname={parts.path.lstrip('/')}"
    )


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        (
            "host=127.0.0.1 port=5432 user=gate password=pw dbname=auth",
            "postgresql://gate:pw@127.0.0.1:5432/auth",
        ),
        (
            r"host = db  password = 'a \' b' dbname='my db' sslmode=require",
            "postgresql://:a%20%27%20b@db/my%20db?sslmode=require",
        ),
        ("host=a,b port=1,2 user=u dbname=d", "postgresql://u@a:1,b:2/d"),
        ("host=/var/run/postgresql dbname=x", "postgresql:///x?host=%2Fvar%2Frun%2Fpostgresql"),
        ("host=::1 port=5 user=u", "postgresql://u@[::1]:5"),
        ("postgresql://u:p@h/d", "postgresql://u:p@h/d"),
    ],
)
def test_keyword_dsns_become_urls(dsn: str, url: str) -> None:
    assert as_url(dsn) == url


@pytest.mark.parametrize(
    "dsn",
    [
        "hunter2",  # a bare word, perhaps the password itself
        "host=db password=hunter2 two",  # an unquoted password with a space
        "host=db password='hunter2",  # an unclosed quote
        "host=db pasword=hunter2",  # a misspelt keyword would not be masked later
    ],
)
def test_a_bad_keyword_dsn_is_refused_without_quoting_a_value(dsn: str) -> None:
    with pytest.raises(ValueError, match=r".") as caught:
        as_url(dsn)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("host=db password=hunter2 dbname=x", "host=db password=*** dbname=x"),
        ("host=db password = 'hunter 2' dbname=x", "host=db password = *** dbname=x"),
        ("postgresql://u:hunter2@db/x?sslmode=require", "postgresql://u:***@db/x?sslmode=require"),
        ("postgresql://u@db/x?password=hunter2", "postgresql://u@db/x?password=***"),
        ("postgresql:///x", "postgresql:///x"),
    ],
)
def test_redact_dsn_masks_both_spellings(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_mask_passwords_in_free_text() -> None:
    text = (
        "failed for host=db password=hunter2 and postgresql://u:hunter3@db/x?password=hunter4&a=1"
    )
    masked = mask_passwords(text)
    assert "hunter" not in masked
    assert "password=*** " in masked
    assert "u:***@db" in masked


def test_settings_turn_a_keyword_dsn_into_a_url_and_never_show_it(tmp_path: Path) -> None:
    env = {"POSTGRES_AUTH_DSN": "host=db.internal port=6543 user=gate password=hunter2 dbname=a"}
    settings = load_settings(environ=env, home=tmp_path)
    assert settings.database_dsn.reveal() == "postgresql://gate:hunter2@db.internal:6543/a"
    assert settings.database_label == "postgresql://gate:***@db.internal:6543/a"
    assert "hunter2" not in repr(settings)
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"POSTGRES_AUTH_DSN": "host=db password=hunter2 x"}, home=tmp_path)
    assert str(caught.value).startswith("POSTGRES_AUTH_DSN=(hidden) from environment: ")
    assert "hunter2" not in str(caught.value)


def test_the_cli_works_with_a_keyword_dsn_and_prints_no_password(
    db_dsn: str, tmp_path: Path
) -> None:
    env = {"POSTGRES_AUTH_DSN": keyword_dsn(db_dsn), "LLAMA_GATE_HOME": str(tmp_path)}
    for args in (["init-db"], ["create-user", "--username", "kw"], ["list-users"]):
        output = ok(env, *args)
        assert SECRET not in output
    assert "postgres:***@" in ok(env, "init-db")
    flag = ok({"LLAMA_GATE_HOME": str(tmp_path)}, "--dsn", keyword_dsn(db_dsn), "list-users")
    assert "kw" in flag


def test_an_unreachable_keyword_dsn_is_one_line_without_its_password(tmp_path: Path) -> None:
    dsn = f"host=127.0.0.1 port=1 user=postgres password={SECRET} dbname=x"
    for env, args in (
        ({"POSTGRES_AUTH_DSN": dsn, "LLAMA_GATE_HOME": str(tmp_path)}, ["list-users"]),
        ({"LLAMA_GATE_HOME": str(tmp_path)}, ["--dsn", dsn, "init-db"]),
        ({"LLAMA_GATE_HOME": str(tmp_path)}, ["--dsn", dsn + " oops", "list-users"]),
    ):
        err = failure(env, *args)
        assert SECRET not in err
