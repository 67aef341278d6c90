"""Settings: precedence, validation with provenance, and secrets that never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings import Secret, SettingsError, load_settings, redact_dsn


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(environ={}, home=tmp_path)
    assert settings.proxy_port == 8001
    assert settings.server_host == "127.0.0.1"
    assert settings.server_port == 8000
    assert settings.rate_limit == 60
    assert settings.rate_window_seconds == 60
    assert settings.proxy_enabled is True
    assert settings.database_dsn.reveal() == "postgresql://postgres@127.0.0.1:5432/llama_gate"


def test_precedence_flag_env_config_dotenv_default(tmp_path: Path) -> None:
    _write(tmp_path / ".env", "LLAMA_PROXY_PORT=1001\nLLAMA_SERVER_PORT=2001\nN_CTX=3001\n")
    _write(tmp_path / "runtime" / "config.env", "LLAMA_PROXY_PORT=1002\nLLAMA_SERVER_PORT=2002\n")
    env = {"LLAMA_PROXY_PORT": "1003"}
    settings = load_settings({"LLAMA_PROXY_PORT": "1004"}, environ=env, home=tmp_path)
    assert settings.proxy_port == 1004  # flag beats everything
    assert load_settings(environ=env, home=tmp_path).proxy_port == 1003  # env beats files
    assert settings.server_port == 2002  # runtime/config.env beats .env
    assert settings.n_ctx == 3001  # .env beats the default
    assert load_settings({"LLAMA_PROXY_PORT": None}, environ={}, home=tmp_path).proxy_port == 1002


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "LLAMA_PROXY_PORT",
            "eighty",
            "LLAMA_PROXY_PORT='eighty' from environment: must be a whole",
        ),
        (
            "LLAMA_SERVER_PORT",
            "70000",
            "LLAMA_SERVER_PORT='70000' from environment: must be a port",
        ),
        ("LLAMA_PROXY_RATE_LIMIT", "0", "LLAMA_PROXY_RATE_LIMIT='0' from environment: must be gre"),
        ("LLAMA_PROXY_RATE_WINDOW_SECONDS", "-5", "LLAMA_PROXY_RATE_WINDOW_SECONDS='-5' from"),
        ("LLAMA_PROXY_ENABLED", "maybe", "LLAMA_PROXY_ENABLED='maybe' from environment: must be 1"),
    ],
)
def test_bad_value_names_variable_and_source(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value}, home=tmp_path)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "runtime" / "config.env", "POSTGRES_AUTH_PORT=abc\n")
    with pytest.raises(SettingsError, match=r"POSTGRES_AUTH_PORT='abc' from .*runtime/config\.env"):
        load_settings(environ={}, home=tmp_path)


def test_unreadable_file_stops_startup(tmp_path: Path) -> None:
    (tmp_path / ".env").mkdir()  # a directory where a file should be: unreadable as a file
    with pytest.raises(SettingsError, match=r"cannot read settings file .*\.env"):
        load_settings(environ={}, home=tmp_path)


def test_secrets_never_in_repr_or_errors(tmp_path: Path) -> None:
    env = {
        "POSTGRES_AUTH_PASSWORD": "hunter2-db-password",
        "LLAMA_SERVER_API_KEY": "internal-backend-key-123",
    }
    settings = load_settings(environ=env, home=tmp_path)
    for shown in (repr(settings), str(settings), f"{settings}", settings.database_label):
        assert "hunter2-db-password" not in shown
        assert "internal-backend-key-123" not in shown
    assert "hunter2-db-password" in settings.database_dsn.reveal()
    assert settings.server_api_key.reveal() == "internal-backend-key-123"
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={**env, "LLAMA_PROXY_PORT": "bad"}, home=tmp_path)
    assert "hunter2" not in str(caught.value)


def test_dsn_parts_are_quoted_and_redacted(tmp_path: Path) -> None:
    env = {
        "POSTGRES_AUTH_HOST": "db.internal",
        "POSTGRES_AUTH_PORT": "6543",
        "POSTGRES_AUTH_DB": "auth",
        "POSTGRES_AUTH_USER": "gate",
        "POSTGRES_AUTH_PASSWORD": "p@ss:w/rd",
    }
    dsn = load_settings(environ=env, home=tmp_path).database_dsn.reveal()
    assert dsn == "postgresql://gate:p%40ss%3Aw%2Frd@db.internal:6543/auth"
    assert redact_dsn(dsn) == "postgresql://gate:***@db.internal:6543/auth"


def test_full_dsn_wins_over_parts(tmp_path: Path) -> None:
    env = {"POSTGRES_AUTH_DSN": "postgresql://u@h:1/d", "POSTGRES_AUTH_HOST": "other"}
    assert load_settings(environ=env, home=tmp_path).database_dsn.reveal() == "postgresql://u@h:1/d"


def test_secret_masks_itself() -> None:
    secret = Secret("s3cr3t")
    assert "s3cr3t" not in repr(secret)
    assert "s3cr3t" not in f"{secret}"
    assert secret.reveal() == "s3cr3t"


def test_fair_sharing_defaults_and_one_backend_from_host_and_port(tmp_path: Path) -> None:
    settings = load_settings(environ={"LLAMA_SERVER_PORT": "8123"}, home=tmp_path)
    assert (settings.backend_slots, settings.max_concurrent) == (1, 4)
    assert settings.queue_timeout_seconds == 300
    assert settings.server_urls == ()
    assert settings.backend_urls == ("http://127.0.0.1:8123",)


def test_several_backend_urls(tmp_path: Path) -> None:
    env = {"LLAMA_SERVER_URLS": " http://127.0.0.1:8000/, https://gpu2.lan:9000 ,,http://[::1]:7"}
    settings = load_settings(environ=env, home=tmp_path)
    expected = ("http://127.0.0.1:8000", "https://gpu2.lan:9000", "http://[::1]:7")
    assert settings.server_urls == expected
    assert settings.backend_urls == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("127.0.0.1:8000", "is not an http:// or https:// URL with a host"),
        ("ftp://h:21", "is not an http:// or https:// URL with a host"),
        ("http://h:99999", "is not a URL"),
        ("http://u:secret@h:8000", "has credentials"),
        ("http://h:8000/v1", "has a path"),
        ("http://h:8000,http://h:8000", "is listed twice"),
    ],
)
def test_a_bad_backend_url_stops_startup_in_one_line(
    tmp_path: Path, value: str, reason: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"LLAMA_SERVER_URLS": value}, home=tmp_path)
    message = str(caught.value)
    assert message.startswith("LLAMA_SERVER_URLS=")
    assert reason in message
    assert "\n" not in message
    assert "secret" not in message  # a password in a URL is masked


@pytest.mark.parametrize(
    "name",
    ["LLAMA_BACKEND_SLOTS", "LLAMA_PROXY_MAX_CONCURRENT", "LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS"],
)
def test_sharing_counts_must_be_positive(tmp_path: Path, name: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}='0' from environment: must be greater"):
        load_settings(environ={name: "0"}, home=tmp_path)


def test_a_password_in_the_dsn_query_is_masked_too() -> None:
    dsn = "postgresql://app@db:5432/x?sslmode=require&password=s3cret"
    shown = redact_dsn(dsn)
    assert "s3cret" not in shown
    assert shown == "postgresql://app@db:5432/x?sslmode=require&password=***"


@pytest.mark.parametrize("value", ["70000", "-1"])
def test_metrics_port_out_of_range_stops_startup(tmp_path: Path, value: str) -> None:
    with pytest.raises(SettingsError, match="LLAMA_PROXY_METRICS_PORT"):
        load_settings(environ={"LLAMA_PROXY_METRICS_PORT": value}, home=tmp_path)
    assert load_settings(environ={"LLAMA_PROXY_METRICS_PORT": "0"}, home=tmp_path).metrics_port == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLAMA_PROXY_RATE_WINDOW_SECONDS", "99999999999"),  # its milliseconds overflow the SQL
        ("LLAMA_PROXY_RATE_LIMIT", "2147483648"),
        ("MAX_TOKENS_HARD_CAP", "99999999999"),
        ("LLAMA_PROXY_MAX_CONCURRENT", "1000000"),
        ("LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS", "1e9"),
    ],
)
def test_values_past_what_their_use_can_hold_stop_startup_in_one_line(
    tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value}, home=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{name}={value!r} from environment: must be")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("raw", "mode"),
    [("ram", "ram"), (" Disk ", "disk"), ("off", "off"), ("0", "off"), ("1", "disk")],
)
def test_prompt_cache_modes_and_the_old_flag(tmp_path: Path, raw: str, mode: str) -> None:
    defaults = load_settings(environ={}, home=tmp_path)
    assert (defaults.prompt_cache, defaults.prompt_cache_bytes) == ("ram", None)
    settings = load_settings(environ={"LLAMA_PROMPT_CACHE": raw}, home=tmp_path)
    assert settings.prompt_cache == mode


@pytest.mark.parametrize(
    ("raw", "size"),
    [("auto", None), ("AUTO", None), ("2G", 2 << 30), ("512MiB", 512 << 20), ("1048576", 1 << 20)],
)
def test_prompt_cache_budget_sizes(tmp_path: Path, raw: str, size: int | None) -> None:
    settings = load_settings(environ={"LLAMA_PROMPT_CACHE_BYTES": raw}, home=tmp_path)
    assert settings.prompt_cache_bytes == size


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LLAMA_PROMPT_CACHE", "yes", "must be ram, disk or off"),
        ("LLAMA_PROMPT_CACHE_BYTES", "lots", "must be auto or a size such as 2G"),
        ("LLAMA_PROMPT_CACHE_BYTES", "10K", "at least 1M (LLAMA_PROMPT_CACHE=off turns"),
        ("LLAMA_PROMPT_CACHE_BYTES", "2000T", "must be at most 1024T"),
    ],
)
def test_bad_prompt_cache_settings_stop_startup_in_one_line(
    tmp_path: Path, name: str, value: str, says: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value}, home=tmp_path)
    assert str(caught.value).startswith(f"{name}={value!r} from environment: ")
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)
