"""One frozen settings object, read once: flag > environment > runtime/config.env > .env > default.

Every setting is declared once, as a field of `Settings` named by the variable a user sets. The
sources are layered here rather than by pydantic-settings, because a bad value must stop startup
with one line naming the variable *and where it came from*, which its sources do not record.
Secrets are wrapped in `Secret` and never reach a repr, log or error.

Numbers are bounded where they are set: a rate window, a limit or a quota that Postgres' integer
columns (or the rate limiter's millisecond arithmetic) cannot hold is refused here, in one line,
instead of failing later as a 500. The CLI's `set-limit` uses the same bounds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from dotenv import dotenv_values
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from proxy.dsn import as_url
from proxy.dsn import mask_passwords as mask_passwords  # re-exported for callers of settings
from proxy.dsn import redact_dsn as redact_dsn

# What the database and the rate limiter can hold (users.* are integer columns; the rate window
# reaches SQL in milliseconds as an integer). Settings and `set-limit` refuse anything beyond.
RATE_LIMIT_MAX = 1_000_000  # admissions per window; each is a row while it is inside the window
RATE_WINDOW_MAX_SECONDS = 7 * 86_400
MAX_CONCURRENT_MAX = 10_000
MAX_TOKENS_MAX = 1_048_576
TOKEN_QUOTA_MAX = 2_147_483_647


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


# -- parsers: each turns the raw text into a value or raises ValueError with a short reason ----


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _int(raw)
        if value < low:
            raise ValueError("must be greater than 0" if low == 1 else f"must be at least {low}")
        if value > high:
            raise ValueError(f"must be at most {high}")
        return value

    return parse


def _port(raw: str) -> int:
    value = _int(raw)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _port_or_off(raw: str) -> int:
    return 0 if _int(raw) == 0 else _port(raw)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be 1 or 0 (or true/false)")


_CACHE_MODES = {"ram": "ram", "disk": "disk", "off": "off", "0": "off", "1": "disk"}


def _cache_mode(raw: str) -> str:
    """ram, disk or off; 0 and 1 keep meaning what they did before there was a choice."""
    mode = _CACHE_MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError("must be ram, disk or off")
    return mode


_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
BYTE_SIZE_MIN = 1 << 20
BYTE_SIZE_MAX = 1 << 50


def _byte_size_or_auto(raw: str) -> int | None:
    """`auto` (None), or a size in bytes: a whole number, optionally with K, M, G or T (x1024)."""
    text = raw.strip()
    if text.lower() == "auto":
        return None
    match = _SIZE.match(text)
    if match is None:
        raise ValueError("must be auto or a size such as 2G, 512M or 1073741824")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < BYTE_SIZE_MIN:
        raise ValueError("must be at least 1M (LLAMA_PROMPT_CACHE=off turns the cache off)")
    if value > BYTE_SIZE_MAX:
        raise ValueError("must be at most 1024T")
    return value


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _optional_text(raw: str) -> str:
    return raw.strip()


def _origins(raw: str) -> tuple[str, ...]:
    """`*`, or a comma-separated list of origins such as `https://chat.example.com`."""
    origins: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        parts = urlsplit(item)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}:
            raise ValueError(f"{item!r} is not an origin like https://chat.example.com (or *)")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return parse


def _secret(raw: str) -> Secret:
    return Secret(raw.strip())


def _dsn(raw: str) -> Secret:
    """A URL, or libpq's `host=... password=...` spelling turned into one (what asyncpg reads)."""
    return Secret(as_url(raw))


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


def _networks(raw: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks, e.g. `127.0.0.1,10.0.0.0/8,::1`."""
    networks: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(str(ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _parsed(parse: Callable[[str], Any]) -> BeforeValidator:
    """Every raw value is text (from a file, the environment or a flag): parse it as such."""
    return BeforeValidator(lambda raw: parse(raw) if isinstance(raw, str) else raw)


Text = Annotated[str, _parsed(_text)]
OptionalText = Annotated[str, _parsed(_optional_text)]
Port = Annotated[int, _parsed(_port)]
PortOrOff = Annotated[int, _parsed(_port_or_off)]
Flag = Annotated[bool, _parsed(_bool)]
SecretText = Annotated[Secret, _parsed(_secret)]
Dsn = Annotated[Secret, _parsed(_dsn)]
Urls = Annotated[tuple[str, ...], _parsed(_urls)]
Origins = Annotated[tuple[str, ...], _parsed(_origins)]
ReasoningMode = Annotated[str, _parsed(_choice("split", "keep", "strip"))]
Networks = Annotated[tuple[str, ...], _parsed(_networks)]
AnyInt = Annotated[int, _parsed(_int)]
CacheMode = Annotated[str, _parsed(_cache_mode)]
ByteSizeOrAuto = Annotated[int | None, _parsed(_byte_size_or_auto)]
# Whole numbers within the bounds their use can hold.
ThreadCount = Annotated[int, _parsed(_whole(0, 1024))]
ContextTokens = Annotated[int, _parsed(_whole(1, 1 << 24))]
BodyBytes = Annotated[int, _parsed(_whole(1, 1 << 30))]
SlotCount = Annotated[int, _parsed(_whole(1, 1024))]
WorkerCount = Annotated[int, _parsed(_whole(1, 64))]
RowCount = Annotated[int, _parsed(_whole(1, 10_000_000))]
UpToAMonth = Annotated[int, _parsed(_whole(1, 30 * 86_400))]
UpToFiveMinutes = Annotated[int, _parsed(_whole(1, 300))]
RetentionDays = Annotated[int, _parsed(_whole(0, 3650))]
UpToADay = Annotated[int, _parsed(_whole(1, 86_400))]
UpToAnHour = Annotated[int, _parsed(_whole(1, 3600))]
EmbeddingInputs = Annotated[int, _parsed(_whole(1, 2048))]
ConcurrencyCap = Annotated[int, _parsed(_whole(1, MAX_CONCURRENT_MAX))]
TokenCap = Annotated[int, _parsed(_whole(1, MAX_TOKENS_MAX))]
RateLimitCount = Annotated[int, _parsed(_whole(1, RATE_LIMIT_MAX))]
RateWindowSeconds = Annotated[int, _parsed(_whole(1, RATE_WINDOW_MAX_SECONDS))]
IterationCap = Annotated[int, _parsed(_whole(1, 100))]


def setting(variable: str, default: str) -> Any:
    """A field read from `variable`; defaults are text, parsed like anything a user writes."""
    return Field(default=default, alias=variable, validate_default=True)


class Settings(BaseModel):
    """Every setting, once: the field, the variable that sets it, its default, and its bounds."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, protected_namespaces=()
    )

    home: Path
    # Postgres: a full DSN overrides the five parts.
    postgres_dsn: Dsn = setting("POSTGRES_AUTH_DSN", "")
    postgres_host: Text = setting("POSTGRES_AUTH_HOST", "127.0.0.1")
    postgres_port: Port = setting("POSTGRES_AUTH_PORT", "5432")
    postgres_db: Text = setting("POSTGRES_AUTH_DB", "llama_gate")
    postgres_user: Text = setting("POSTGRES_AUTH_USER", "postgres")
    postgres_password: SecretText = setting("POSTGRES_AUTH_PASSWORD", "")
    # `0` serves the backend alone on its own key (single-key deployments).
    proxy_enabled: Flag = setting("LLAMA_PROXY_ENABLED", "1")
    server_host: Text = setting("LLAMA_SERVER_HOST", "127.0.0.1")
    server_port: Port = setting("LLAMA_SERVER_PORT", "8000")
    server_api_key: SecretText = setting("LLAMA_SERVER_API_KEY", "")
    # Several backends (llama_cpp.server processes, on this box or others); "" = the one above.
    server_urls: Urls = setting("LLAMA_SERVER_URLS", "")
    proxy_host: Text = setting("LLAMA_PROXY_HOST", "0.0.0.0")  # noqa: S104 - the front door
    proxy_port: Port = setting("LLAMA_PROXY_PORT", "8001")
    # Proxy processes `serve` runs on the one port; more than one share the backends' slots and
    # the fair order through Postgres (`proxy.cluster.slots`).
    workers: WorkerCount = setting("LLAMA_PROXY_WORKERS", "1")
    rate_limit: RateLimitCount = setting("LLAMA_PROXY_RATE_LIMIT", "60")
    rate_window_seconds: RateWindowSeconds = setting("LLAMA_PROXY_RATE_WINDOW_SECONDS", "60")
    max_body_bytes: BodyBytes = setting("LLAMA_PROXY_MAX_BODY_BYTES", str(8 << 20))
    # No answer grows past this (top_logprobs on a long answer can make megabytes per token).
    max_answer_bytes: BodyBytes = setting("LLAMA_PROXY_MAX_ANSWER_BYTES", str(16 << 20))
    # Days a stored Responses API answer (`store`, OpenAI's default) is kept, for
    # previous_response_id and GET /v1/responses/{id}; 0 stores none (`store` is then ignored).
    responses_retention_days: RetentionDays = setting("LLAMA_PROXY_RESPONSES_RETENTION", "30")
    # A connection must send a whole request head within this many seconds of opening (or of
    # its previous answer); a slow sender is cut off, an idle keep-alive connection closed.
    header_timeout_seconds: UpToFiveMinutes = setting("LLAMA_PROXY_HEADER_TIMEOUT_SECONDS", "10")
    # A request body must arrive whole within this (then 408); it holds its place meanwhile.
    body_timeout_seconds: UpToFiveMinutes = setting("LLAMA_PROXY_BODY_TIMEOUT_SECONDS", "30")
    # A client that takes longer than this to accept a piece of its answer is cut off (499)
    # and its backend slot freed.
    client_timeout_seconds: UpToFiveMinutes = setting("LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS", "30")
    # Origins browsers may call the API from. "*" by default: keys travel in headers a page must
    # already hold (never cookies) and credentials are never allowed, so any page can do with
    # the proxy only what its key lets it; list origins to narrow it, or leave empty for none.
    cors_origins: Origins = setting("LLAMA_PROXY_CORS_ORIGINS", "*")
    # A model's <think>...</think> on /v1/chat/completions: apart from the answer as
    # `reasoning_content` (split), inline as generated (keep), or dropped (strip).
    reasoning: ReasoningMode = setting("LLAMA_PROXY_REASONING", "split")
    # Reverse proxies whose X-Forwarded-For names the client (failure limit, audit rows,
    # /ready's details); from any other peer the header is ignored. "" = no reverse proxy.
    trusted_proxies: Networks = setting("LLAMA_PROXY_TRUSTED_PROXIES", "")
    # How long a verified key is trusted without asking Postgres again; revocations normally
    # arrive within a second through LISTEN/NOTIFY, this bounds staleness if one is lost.
    auth_cache_seconds: UpToADay = setting("LLAMA_PROXY_AUTH_CACHE_SECONDS", "30")
    # How long a verified key keeps working while Postgres is unreachable.
    auth_stale_seconds: UpToAMonth = setting("LLAMA_PROXY_AUTH_STALE_SECONDS", "3600")
    db_timeout_seconds: UpToFiveMinutes = setting("LLAMA_PROXY_DB_TIMEOUT_SECONDS", "2")
    connect_timeout_seconds: UpToFiveMinutes = setting("LLAMA_PROXY_CONNECT_TIMEOUT_SECONDS", "5")
    # Longest silence from the backend (before headers or between chunks) before a 504 / cut.
    upstream_timeout_seconds: UpToADay = setting("LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS", "600")
    # No request may ask for more tokens than this (one holds the model for its whole answer);
    # a request above it, or without max_tokens, is sent with the cap. Users' own caps too.
    max_tokens_hard_cap: TokenCap = setting("MAX_TOKENS_HARD_CAP", "1024")
    # Requests each backend serves at once; llama_cpp.server generates for one at a time.
    backend_slots: SlotCount = setting("LLAMA_BACKEND_SLOTS", "1")
    # Requests one user may have in flight or queued at once (across proxy processes too).
    max_concurrent: ConcurrencyCap = setting("LLAMA_PROXY_MAX_CONCURRENT", "4")
    # Longest wait for a backend slot before a 503. Half of the OpenAI Python client's own
    # 600 s timeout, so a client hears "busy, retry later" rather than timing out by itself,
    # with room left for the answer (1024 tokens at ~50 tokens/s take ~20 s).
    queue_timeout_seconds: UpToADay = setting("LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS", "300")
    # A backend that went down (its supervisor restarts it within seconds) is waited for this
    # long, within each request's queue timeout, before requests only it can serve get a 503.
    backend_restart_wait_seconds: UpToAnHour = setting(
        "LLAMA_PROXY_BACKEND_RESTART_WAIT_SECONDS", "30"
    )
    # One embeddings request: at most this many inputs, and this many tokens in all (each input
    # within the model's context). Every one is measured and charged before its turn.
    max_embedding_inputs: EmbeddingInputs = setting("LLAMA_PROXY_MAX_EMBEDDING_INPUTS", "128")
    max_embedding_tokens: TokenCap = setting("LLAMA_PROXY_MAX_EMBEDDING_TOKENS", "4096")
    # The JSON-RPC tool loop (POST /rpc create_message): the most model turns a client may ask
    # for (`max_iterations`, 5 by default) before the server asks for a final answer.
    max_tool_iterations: IterationCap = setting("LLAMA_PROXY_MAX_TOOL_ITERATIONS", "10")
    # A JSON file of the tools this deployment declares (JSON-RPC `tool_list`, and the tools of
    # requests that name none); "" = none. Relative to LLAMA_GATE_HOME; read at startup.
    tools_file: OptionalText = setting("LLAMA_PROXY_TOOLS_FILE", "")
    # Audit rows held in memory while Postgres is unreachable; past this they spill to
    # runtime/audit-spill/ and are replayed when it returns.
    audit_memory_rows: RowCount = setting("LLAMA_PROXY_AUDIT_MEMORY_ROWS", "20000")
    # Each finished request's row is written to a journal in runtime/audit-spill/ before it is
    # batched, so a killed proxy loses none; 0 keeps rows in memory only until they are written.
    audit_journal: Flag = setting("LLAMA_PROXY_AUDIT_JOURNAL", "1")
    # Users signed in to the dashboard with their own API key may make and revoke their own keys.
    self_service_keys: Flag = setting("LLAMA_PROXY_SELF_SERVICE_KEYS", "0")
    # Prometheus metrics, on loopback by default; port 0 turns them off.
    metrics_host: Text = setting("LLAMA_PROXY_METRICS_HOST", "127.0.0.1")
    metrics_port: PortOrOff = setting("LLAMA_PROXY_METRICS_PORT", "9101")
    # The admins' web dashboard, on its own listener (loopback by default; reach it from another
    # machine through an SSH tunnel); port 0 turns it off.
    dashboard_host: Text = setting("LLAMA_PROXY_DASHBOARD_HOST", "127.0.0.1")
    dashboard_port: PortOrOff = setting("LLAMA_PROXY_DASHBOARD_PORT", "9102")
    # The backend (llama_cpp.server) launcher.
    model: OptionalText = setting("LLAMA_MODEL", "")  # a models/*.gguf stem; "" = the first
    server_allow_remote: Flag = setting("LLAMA_SERVER_ALLOW_REMOTE", "0")
    n_ctx: ContextTokens = setting("N_CTX", "2048")
    n_threads: ThreadCount = setting("N_THREADS", "0")  # 0 = llama.cpp's own choice
    n_gpu_layers: AnyInt = setting("N_GPU_LAYERS", "0")
    chat_format: OptionalText = setting("LLAMA_CHAT_FORMAT", "")  # "" = the GGUF's template
    # The backend's prompt cache: each conversation's state kept between its turns.
    prompt_cache: CacheMode = setting("LLAMA_PROMPT_CACHE", "ram")
    # Its budget in bytes; auto derives one from the machine (see backend.cache_plan).
    prompt_cache_bytes: ByteSizeOrAuto = setting("LLAMA_PROMPT_CACHE_BYTES", "auto")

    @property
    def database_dsn(self) -> Secret:
        """POSTGRES_AUTH_DSN, or the DSN the five POSTGRES_AUTH_* parts spell."""
        if self.postgres_dsn:
            return self.postgres_dsn
        user = quote(self.postgres_user, safe="")
        password = self.postgres_password.reveal()
        auth = f"{user}:{quote(password, safe='')}" if password else user
        host = f"[{self.postgres_host}]" if ":" in self.postgres_host else self.postgres_host
        database = quote(self.postgres_db, safe="")
        return Secret(f"postgresql://{auth}@{host}:{self.postgres_port}/{database}")

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


VARIABLES: dict[str, str] = {
    str(info.alias): name for name, info in Settings.model_fields.items() if info.alias
}
SECRET_VARIABLES = frozenset(
    variable
    for variable, name in VARIABLES.items()
    if Settings.model_fields[name].annotation is Secret
)
# Each variable's default, as text (what .env.example and docker-compose.yml must agree with).
DEFAULTS: dict[str, str] = {
    variable: str(Settings.model_fields[name].default) for variable, name in VARIABLES.items()
}
# Read by the shell scripts rather than by Settings.
KNOWN_VARIABLES = frozenset(VARIABLES) | {"LLAMA_GATE_HOME", "LLAMA_GATE_LOCAL_POSTGRES"}


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
    raw: dict[str, Any] = {"home": root}
    origin: dict[str, tuple[str, str]] = {}
    for variable in VARIABLES:
        for source, layer in layers:
            if variable in layer:
                raw[variable] = layer[variable]
                origin[variable] = (source, layer[variable])
                break
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc, origin)) from None


def _one_line(exc: ValidationError, origin: Mapping[str, tuple[str, str]]) -> str:
    error = exc.errors(include_url=False)[0]
    variable = str(error["loc"][0]) if error["loc"] else "settings"
    field_info = Settings.model_fields.get(VARIABLES.get(variable, ""))
    source, value = origin.get(variable, ("default", str(field_info.default if field_info else "")))
    shown = "(hidden)" if variable in SECRET_VARIABLES else repr(mask_passwords(value))
    cause = error.get("ctx", {}).get("error")
    reason = str(cause) if cause is not None else error["msg"]
    return f"{variable}={shown} from {source}: {reason}"
