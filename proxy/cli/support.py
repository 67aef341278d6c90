"""What every admin command shares: settings, one database connection, input types, output."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import click

from proxy.db.connect import DatabaseUnavailable, connect
from proxy.db.numbers import plain_number
from proxy.db.schema import USERNAME_PATTERN
from proxy.settings import Settings, SettingsError, load_settings, mask_passwords

T = TypeVar("T")
Row = Mapping[str, Any] | asyncpg.Record

_USERNAME_RE = re.compile(USERNAME_PATTERN)
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration any option takes: dates stay far inside what Python and Postgres hold.
LONGEST = timedelta(days=36500)
USERNAME_RULE = "1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"


class OneLineError(click.ClickException):
    """An error as the README promises: one line on stderr (no usage block), no password."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(mask_passwords(message).split()))


class OneLineUsageError(OneLineError):
    """A command line click could not take; exit status 2, as click's own usage errors."""

    exit_code = 2


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except OneLineError:
        raise
    except click.UsageError as exc:  # click would print Usage:, Try ... --help and Error: lines
        hint = f"; see {exc.ctx.command_path} --help" if exc.ctx else ""
        raise OneLineUsageError(exc.format_message().rstrip(".") + hint) from None
    except click.ClickException as exc:
        raise OneLineError(exc.format_message()) from None


class _OneLineErrors(click.Command):
    """Parsing its options and running it: whatever fails is said in one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


class OneLineCommand(_OneLineErrors):
    """A command whose errors, its options' included, are each one line."""


class OneLineGroup(_OneLineErrors, click.Group):
    """The command group: errors of its own options and of every subcommand are one line."""


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_passwords(super().format(record))


def configure_logging() -> None:
    """Log lines on stderr; a password that reaches one anyway (a driver's message) is masked."""
    logging.basicConfig(level=logging.WARNING)
    formatter = _MaskingFormatter("%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


@dataclass
class CliState:
    """Per-invocation state on click's context: flag overrides, then settings built once."""

    overrides: dict[str, str | None] = field(default_factory=dict)
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.overrides)
            except SettingsError as exc:
                raise click.ClickException(str(exc)) from None
        return self._settings


def state() -> CliState:
    return click.get_current_context().ensure_object(CliState)


def run_db(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on one connection; turn database failures into one clear line and exit 1."""
    settings = state().settings()

    async def main() -> T:
        con = await connect(settings)
        try:
            return await work(con)
        finally:
            await con.close()

    try:
        return asyncio.run(main())
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except asyncpg.UndefinedTableError:
        raise click.ClickException(
            f"the llama-gate tables are missing in {settings.database_label}: "
            "run `llama-gate init-db` first"
        ) from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise click.ClickException(f"database error: {exc}") from None


def username_arg(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Usernames are case-insensitive: store and look up the lower-cased form."""
    if value is None:
        return None
    normalized = value.strip().lower()
    if not _USERNAME_RE.match(normalized):
        raise click.BadParameter(f"{value!r} is not a valid username: use {USERNAME_RULE}")
    return normalized


class Duration(click.ParamType[timedelta]):
    """`90d`, `12h`, `30m`, `45s` or `2w`, up to `LONGEST`; `positive` refuses `0d`."""

    name = "duration"

    def __init__(self, positive: bool = False) -> None:
        self._positive = positive

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION_RE.match(str(value).strip().lower())
        if not match:
            self.fail(f"{value!r} is not a duration: write e.g. 90d, 12h, 30m or 45s", param, ctx)
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds > LONGEST.total_seconds():
            self.fail(f"{value!r} is too long: at most {LONGEST.days}d (100 years)", param, ctx)
        if self._positive and seconds == 0:
            self.fail(f"{value!r} is no time at all: give a duration above 0", param, ctx)
        return timedelta(seconds=seconds)


class SinceDate(click.ParamType[date]):
    """A start day: `2026-11-01`, or a duration back from today such as `7d`."""

    name = "date|duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> date:
        if isinstance(value, date):
            return value
        text = str(value).strip()
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
        if _DURATION_RE.match(text.lower()):
            return date.today() - Duration().convert(text, param, ctx)
        self.fail(f"{value!r} is neither a date (2026-11-01) nor a duration (7d)", param, ctx)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_table(rows: Sequence[Row], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row_cells in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row_cells, widths, strict=True)).rstrip())


def print_json(rows: Sequence[Row]) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, datetime | date):
            return value.isoformat()
        if isinstance(value, Decimal):  # sums and the view's rounded percentiles
            return plain_number(value)
        return str(value)

    click.echo(json.dumps([dict(row) for row in rows], default=default, indent=2))
