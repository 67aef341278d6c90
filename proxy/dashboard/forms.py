"""What admins type into the dashboard, checked: each parser returns a value or raises
`FormError` with a sentence saying what is wrong and what to write instead.

The bounds are the ones `llama-gate set-limit` and the settings use (what Postgres' integer
columns and the proxy's arithmetic can hold), so nothing set here can fail later as a 500.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from proxy.auth.apikeys import KEY_ID_RE
from proxy.db.ledger import RequestFilter
from proxy.db.schema import USERNAME_PATTERN
from proxy.settings import (
    MAX_CONCURRENT_MAX,
    MAX_TOKENS_MAX,
    RATE_LIMIT_MAX,
    RATE_WINDOW_MAX_SECONDS,
    TOKEN_QUOTA_MAX,
)

_USERNAME_RE = re.compile(USERNAME_PATTERN)
_STATUS_CLASS_RE = re.compile(r"^([1-5])xx$")
MAX_TEXT_CHARS = 200

# Each limit a user may override, with its form label and the largest value it can hold.
LIMITS: dict[str, tuple[str, int]] = {
    "rate_limit": ("requests per window", RATE_LIMIT_MAX),
    "rate_window_seconds": ("window (seconds)", RATE_WINDOW_MAX_SECONDS),
    "max_concurrent": ("at once (in flight or queued)", MAX_CONCURRENT_MAX),
    "max_tokens": ("max_tokens cap", MAX_TOKENS_MAX),
    "tokens_per_day": ("tokens per day (UTC)", TOKEN_QUOTA_MAX),
    "tokens_per_minute": ("tokens per minute", TOKEN_QUOTA_MAX),
}

# What a new key (or a rotation's old key) may be given: a choice, not free text.
EXPIRIES: dict[str, timedelta | None] = {
    "": None,
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
    "365d": timedelta(days=365),
}
GRACES: dict[str, timedelta] = {
    "0": timedelta(0),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}


class FormError(ValueError):
    """Input the dashboard cannot use; the message is shown to the admin as it is."""


def _text(form: Mapping[str, object], name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise FormError(f"{name} must be text.")
    if len(value) > MAX_TEXT_CHARS:
        raise FormError(f"{name} is longer than {MAX_TEXT_CHARS} characters.")
    return value.strip()


def username(raw: str) -> str:
    """Usernames are case-insensitive: stored and looked up lower-cased."""
    value = raw.strip().lower()
    if not _USERNAME_RE.match(value):
        raise FormError(f"{raw!r} is not a valid username: use 1-64 characters of a-z 0-9 . _ -")
    return value


def key_id(raw: str) -> str:
    value = raw.strip().removeprefix("lgk_")
    if not KEY_ID_RE.match(value):
        raise FormError(f"{raw!r} is not a key id: it is 16 hex digits.")
    return value


def label(form: Mapping[str, object]) -> str | None:
    return _text(form, "label") or None


def choice(form: Mapping[str, object], name: str, choices: Mapping[str, object]) -> str:
    value = _text(form, name)
    if value not in choices:
        raise FormError(f"{value!r} is not one of the choices for {name}.")
    return value


def limits(form: Mapping[str, object]) -> dict[str, int | None]:
    """Every limit column from the form: a whole number within bounds, or blank (or `default`)
    for no override (the proxy's setting; for token quotas: none)."""
    values: dict[str, int | None] = {}
    for column, (what, most) in LIMITS.items():
        text = _text(form, column).lower()
        if text in {"", "default", "none"}:
            values[column] = None
        elif not text.isdigit() or int(text) == 0:
            raise FormError(f"{what}: {text!r} is not a whole number above 0 (or blank).")
        elif int(text) > most:
            raise FormError(f"{what}: {text} is more than this limit can be: at most {most}.")
        else:
            values[column] = int(text)
    return values


# -- the Requests page's filters ---------------------------------------------------------------


@dataclass(frozen=True)
class LogQuery:
    """The Requests page's filters as given (to put back into forms and links) and as parsed."""

    given: dict[str, str]
    where: RequestFilter
    before: tuple[datetime, int] | None


FILTER_FIELDS = ("user", "status", "path", "since", "until")


def _moment(name: str, raw: str) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise FormError(
            f"{name}: {raw!r} is not a time; write e.g. 2026-12-01T09:30 (UTC)."
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status(raw: str) -> tuple[int | None, int | None]:
    if not raw:
        return None, None
    if raw == "errors":
        return 400, 599
    if match := _STATUS_CLASS_RE.match(raw):
        low = int(match.group(1)) * 100
        return low, low + 99
    if raw.isdigit() and 100 <= int(raw) <= 599:
        return int(raw), int(raw)
    raise FormError(f"status: {raw!r} is neither a status code (429) nor a class (4xx, errors).")


def cursor(created_at: datetime, row_id: int) -> str:
    return f"{created_at.isoformat()}|{row_id}"


def _cursor(raw: str) -> tuple[datetime, int] | None:
    if not raw:
        return None
    moment, _, row_id = raw.rpartition("|")
    try:
        value = datetime.fromisoformat(moment)
        if value.tzinfo is None or not row_id.isdigit():
            raise ValueError(raw)
    except ValueError:
        raise FormError("That page link is damaged; start again from the first page.") from None
    return value, int(row_id)


def log_query(query: Mapping[str, str]) -> LogQuery:
    given = {name: _text(query, name) for name in FILTER_FIELDS}
    status_from, status_to = _status(given["status"].lower())
    where = RequestFilter(
        username=username(given["user"]) if given["user"] else None,
        status_from=status_from,
        status_to=status_to,
        path=given["path"] or None,
        since=_moment("since", given["since"]),
        until=_moment("until", given["until"]),
    )
    return LogQuery({k: v for k, v in given.items() if v}, where, _cursor(_text(query, "before")))
