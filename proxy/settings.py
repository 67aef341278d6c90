"""One frozen settings object, read once: flag > environment > runtime/config.env > .env > default.

Every value remembers where it came from, so a bad one stops startup with a single line that names
the variable and its source. Secrets are wrapped in `Secret` and never reach a repr, log or error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from dotenv import dotenv_values


class SettingsError(Exception):
    """A setting is missing or malformed; the message is one line meant for the operator."""


@dataclass(frozen=True)
class Secret:
    """A string that only `reveal()` shows: repr, str and f-strings print a mask."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "**********"

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __bool__(self) -> bool:
        return bool(self._value)


def _port(raw: str) -> int:
    value = _int(raw)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _port_or_off(raw: str) -> int:
    return 0 if _int(raw) == 0 else _port(raw)


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_int(raw: str) -> int:
    value = _int(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


_PASSWORD_IN_URL = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")


def mask_passwords(text: str) -> str:
    """`text` with the password of any `scheme://user:password@host` in it masked."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", text)


def _urls(raw: str) -> tuple[str, ...]:
    """A comma-separated list of backend base URLs, e.g. `http://127.0.0.1:8000,http://gpu2:8000`."""
    urls: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            parts = urlsplit(item)
            parts.port  # noqa: B018 - raises ValueError for a port that is no number or too big
        except ValueError:
            raise ValueError(f"{item!r} is not a URL") from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"{item!r} is not an http:// or https:// URL with a host")
        if parts.username or parts.password:
            shown = mask_passwords(item)
            raise ValueError(f"{shown!r} has credentials: give the key as LLAMA_SERVER_API_KEY")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ValueError(f"{item!r} has a path; give only scheme, host and port")
        url = f"{parts.scheme}://{parts.netloc}"
        if url in urls:
            raise ValueError(f"{item!r} is listed twice")
        urls.append(url)
    return tuple(urls)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be 1 or 0 (or true/false)")


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _optional_text(raw: str) -> str:
    return raw.strip()


# name -> (parser, default). Defaults are strings so they go through the same parser as user input.
_FIELDS: dict[str, tuple[Callable[[str], Any], str]] = {
    "POSTGRES_AUTH_DSN": (_optional_text, ""),
    "POSTGRES_AUTH_HOST": (_text, "127.0.0.1"),
    "POSTGRES_AUTH_PORT": (_port, "5432"),
    "POSTGRES_AUTH_DB": (_text, "llama_gate"),
    "POSTGRES_AUTH_USER": (_text, "postgres"),
    "POSTGRES_AUTH_PASSWORD": (_optional_text, ""),
    "LLAMA_PROXY_ENABLED": (_bool, "1"),
    "LLAMA_SERVER_HOST": (_text, "127.0.0.1"),
    "LLAMA_SERVER_PORT": (_port, "8000"),
    "LLAMA_SERVER_API_KEY": (_optional_text, ""),
    # Several backends (llama_cpp.server processes, on this box or others); "" = the one above.
    "LLAMA_SERVER_URLS": (_urls, ""),
    "LLAMA_PROXY_HOST": (_text, "0.0.0.0"),  # noqa: S104 - the proxy is the authenticated front door
    "LLAMA_PROXY_PORT": (_port, "8001"),
    "LLAMA_PROXY_RATE_LIMIT": (_positive_int, "60"),
    "LLAMA_PROXY_RATE_WINDOW_SECONDS": (_positive_int, "60"),
    "LLAMA_PROXY_MAX_BODY_BYTES": (_positive_int, str(8 * 1024 * 1024)),
    # How long a verified key is trusted without asking Postgres again; revocations normally
    # arrive within a second through LISTEN/NOTIFY, this bounds staleness if one is lost.
    "LLAMA_PROXY_AUTH_CACHE_SECONDS": (_positive_int, "30"),
    # How long a verified key keeps working while Postgres is unreachable.
    "LLAMA_PROXY_AUTH_STALE_SECONDS": (_positive_int, "3600"),
    "LLAMA_PROXY_DB_TIMEOUT_SECONDS": (_positive_int, "2"),  # per query on the request path
    "LLAMA_PROXY_CONNECT_TIMEOUT_SECONDS": (_positive_int, "5"),  # to the backend
    # Longest silence from the backend (before headers or between chunks) before a 504 / cut.
    "LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS": (_positive_int, "600"),
    # No request may ask for more tokens than this (one holds the model for its whole answer);
    # a request above it, or without max_tokens, is sent with the cap.
    "MAX_TOKENS_HARD_CAP": (_positive_int, "1024"),
    # Requests each backend serves at once; llama_cpp.server generates for one at a time.
    "LLAMA_BACKEND_SLOTS": (_positive_int, "1"),
    # Requests one user may have in flight or queued at once (per proxy process).
    "LLAMA_PROXY_MAX_CONCURRENT": (_positive_int, "4"),
    # Longest wait for a backend slot before a 503. Half of the OpenAI Python client's own
    # 600 s timeout, so a client hears "busy, retry later" rather than timing out by itself,
    # with room left for the answer (1024 tokens at ~50 tokens/s take ~20 s).
    "LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS": (_positive_int, "300"),
    # Audit rows held in memory while Postgres is unreachable; past this they spill to
    # runtime/audit-spill/ and are replayed when it returns.
    "LLAMA_PROXY_AUDIT_MEMORY_ROWS": (_positive_int, "20000"),
    # Prometheus metrics, on loopback by default; port 0 turns them off.
    "LLAMA_PROXY_METRICS_HOST": (_text, "127.0.0.1"),
    "LLAMA_PROXY_METRICS_PORT": (_port_or_off, "9101"),
    # The backend (llama_cpp.server) launcher.
    "LLAMA_MODEL": (_optional_text, ""),  # default model alias (a models/*.gguf stem); "" = first
    "LLAMA_SERVER_ALLOW_REMOTE": (_bool, "0"),  # allow a non-loopback LLAMA_SERVER_HOST
    "N_CTX": (_positive_int, "2048"),
    "N_THREADS": (_int, "0"),  # 0 = one per physical core, llama.cpp's own choice
    "N_GPU_LAYERS": (_int, "0"),
    "LLAMA_CHAT_FORMAT": (_optional_text, ""),  # "" = the template stored in the GGUF
    "LLAMA_PROMPT_CACHE": (_bool, "0"),  # llama_cpp.server's disk cache under runtime/cache/
}
SECRET_FIELDS = frozenset({"POSTGRES_AUTH_DSN", "POSTGRES_AUTH_PASSWORD", "LLAMA_SERVER_API_KEY"})
# Read by the shell scripts rather than by Settings.
KNOWN_VARIABLES = frozenset(_FIELDS) | {"LLAMA_GATE_HOME", "LLAMA_GATE_LOCAL_POSTGRES"}


@dataclass(frozen=True)
class Settings:
    home: Path
    database_dsn: Secret
    proxy_enabled: bool
    server_host: str
    server_port: int
    server_api_key: Secret
    server_urls: tuple[str, ...]
    proxy_host: str
    proxy_port: int
    rate_limit: int
    rate_window_seconds: int
    max_body_bytes: int
    auth_cache_seconds: int
    auth_stale_seconds: int
    db_timeout_seconds: int
    connect_timeout_seconds: int
    upstream_timeout_seconds: int
    max_tokens_hard_cap: int
    backend_slots: int
    max_concurrent: int
    queue_timeout_seconds: int
    audit_memory_rows: int
    metrics_host: str
    metrics_port: int
    model: str
    server_allow_remote: bool
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
    chat_format: str
    prompt_cache: bool

    @property
    def runtime_dir(self) -> Path:
        return self.home / "runtime"

    @property
    def database_label(self) -> str:
        """The DSN without its password: safe for messages and logs."""
        return redact_dsn(self.database_dsn.reveal())

    @property
    def backend_url(self) -> str:
        return f"http://{self.server_host}:{self.server_port}"

    @property
    def backend_urls(self) -> tuple[str, ...]:
        """Every backend the proxy sends to: LLAMA_SERVER_URLS, else the one host and port."""
        return self.server_urls or (self.backend_url,)


def redact_dsn(dsn: str) -> str:
    """The DSN with its password masked, wherever it stands (user part or `?password=`)."""
    parts = urlsplit(dsn)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if parts.query:
        query = [
            (name, "***" if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        with path.open(encoding="utf-8") as handle:
            values = dotenv_values(stream=handle)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"cannot read settings file {path}: {reason}") from None
    return {key: value for key, value in values.items() if value is not None}


def load_settings(
    overrides: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Settings:
    """Build the settings from every source; raise `SettingsError` naming the first bad value.

    `overrides` are CLI flags keyed by the variable they stand for (None means "not given").
    """
    env = os.environ if environ is None else environ
    root = home or Path(env.get("LLAMA_GATE_HOME") or Path.cwd()).resolve()
    layers: list[tuple[str, Mapping[str, str]]] = [
        ("command-line option", {k: v for k, v in (overrides or {}).items() if v is not None}),
        ("environment", env),
        (str(root / "runtime" / "config.env"), _read_env_file(root / "runtime" / "config.env")),
        (str(root / ".env"), _read_env_file(root / ".env")),
    ]
    values: dict[str, Any] = {}
    for name, (parse, default) in _FIELDS.items():
        raw, origin = default, "default"
        for source, layer in layers:
            if name in layer:
                raw, origin = layer[name], source
                break
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if name in SECRET_FIELDS else repr(mask_passwords(raw))
            raise SettingsError(f"{name}={shown} from {origin}: {exc}") from None
    return Settings(
        home=root,
        database_dsn=Secret(values["POSTGRES_AUTH_DSN"] or _dsn_from_parts(values)),
        proxy_enabled=values["LLAMA_PROXY_ENABLED"],
        server_host=values["LLAMA_SERVER_HOST"],
        server_port=values["LLAMA_SERVER_PORT"],
        server_api_key=Secret(values["LLAMA_SERVER_API_KEY"]),
        server_urls=values["LLAMA_SERVER_URLS"],
        proxy_host=values["LLAMA_PROXY_HOST"],
        proxy_port=values["LLAMA_PROXY_PORT"],
        rate_limit=values["LLAMA_PROXY_RATE_LIMIT"],
        rate_window_seconds=values["LLAMA_PROXY_RATE_WINDOW_SECONDS"],
        max_body_bytes=values["LLAMA_PROXY_MAX_BODY_BYTES"],
        auth_cache_seconds=values["LLAMA_PROXY_AUTH_CACHE_SECONDS"],
        auth_stale_seconds=values["LLAMA_PROXY_AUTH_STALE_SECONDS"],
        db_timeout_seconds=values["LLAMA_PROXY_DB_TIMEOUT_SECONDS"],
        connect_timeout_seconds=values["LLAMA_PROXY_CONNECT_TIMEOUT_SECONDS"],
        upstream_timeout_seconds=values["LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS"],
        max_tokens_hard_cap=values["MAX_TOKENS_HARD_CAP"],
        backend_slots=values["LLAMA_BACKEND_SLOTS"],
        max_concurrent=values["LLAMA_PROXY_MAX_CONCURRENT"],
        queue_timeout_seconds=values["LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS"],
        audit_memory_rows=values["LLAMA_PROXY_AUDIT_MEMORY_ROWS"],
        metrics_host=values["LLAMA_PROXY_METRICS_HOST"],
        metrics_port=values["LLAMA_PROXY_METRICS_PORT"],
        model=values["LLAMA_MODEL"],
        server_allow_remote=values["LLAMA_SERVER_ALLOW_REMOTE"],
        n_ctx=values["N_CTX"],
        n_threads=values["N_THREADS"],
        n_gpu_layers=values["N_GPU_LAYERS"],
        chat_format=values["LLAMA_CHAT_FORMAT"],
        prompt_cache=values["LLAMA_PROMPT_CACHE"],
    )


def _dsn_from_parts(values: Mapping[str, Any]) -> str:
    user = quote(values["POSTGRES_AUTH_USER"], safe="")
    password = values["POSTGRES_AUTH_PASSWORD"]
    auth = f"{user}:{quote(password, safe='')}" if password else user
    host = values["POSTGRES_AUTH_HOST"]
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    database = quote(values["POSTGRES_AUTH_DB"], safe="")
    return f"postgresql://{auth}@{host}:{values['POSTGRES_AUTH_PORT']}/{database}"
