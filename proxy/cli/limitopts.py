"""Options that set limits, shared by the commands for users, keys and groups."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from proxy.db.limits import PERIODS
from proxy.settings import RATE_LIMIT_MAX, RATE_WINDOW_MAX_SECONDS, TOKEN_QUOTA_MAX

F = TypeVar("F", bound=Callable[..., Any])

BUDGET_HELP = {
    "minute": "Tokens (prompt + completion, times the model's weight) per calendar minute.",
    "day": "... per day (a group's: from midnight in its time zone; a key's: UTC).",
    "week": "... per ISO week, from Monday 00:00.",
    "month": "... per calendar month.",
}


class Override(click.ParamType[int]):
    """A whole number from 1 to `most`, or `default` (also `none`) to drop the override: 0 then.

    `most` is what the column and the proxy's arithmetic can hold, so no value set here can
    fail later as a 500.
    """

    name = "N|default"

    def __init__(self, most: int) -> None:
        self._most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in {"default", "none"}:
            return 0
        if not text.isdigit() or int(text) == 0:
            self.fail(f"{value!r} is neither a whole number above 0 nor 'default'", param, ctx)
        if int(text) > self._most:
            self.fail(f"{value} is more than this limit can be: at most {self._most}", param, ctx)
        return int(text)


def budget_options(command: F) -> F:
    """--tokens-per-minute/day/week/month: a group's or a key's token budgets."""
    for per in reversed(PERIODS):
        option = click.option(
            f"--tokens-per-{per}", type=Override(TOKEN_QUOTA_MAX), help=BUDGET_HELP[per]
        )
        command = option(command)
    return command


def key_limit_options(command: F) -> F:
    """A key's own limits: --rate-limit, --window and its budgets."""
    command = budget_options(command)
    command = click.option(
        "--window",
        type=Override(RATE_WINDOW_MAX_SECONDS),
        help="The key's rate window in seconds (default: the proxy's).",
    )(command)
    return click.option(
        "--rate-limit",
        type=Override(RATE_LIMIT_MAX),
        help="Requests this key may make per window, beside its user's limit.",
    )(command)


def limit_columns(given: Mapping[str, int | None]) -> dict[str, int | None]:
    """Options given (0: `none`, dropped) as the columns they set."""
    columns = {"window": "rate_window_seconds"}
    return {columns.get(name, name): value or None for name, value in given.items()
            if value is not None}  # fmt: skip


def describe_budgets(row: Mapping[str, Any]) -> str:
    budgets = [
        f"{row[f'tokens_per_{per}']} tokens per {per}"
        for per in PERIODS
        if row.get(f"tokens_per_{per}") is not None
    ]
    return ", ".join(budgets) if budgets else "no token budget"


def describe_key_limits(row: Mapping[str, Any]) -> str:
    rate = (
        f"{row['rate_limit']} requests per {row.get('rate_window_seconds') or 'default'} s"
        if row.get("rate_limit") is not None
        else "no request limit of its own"
    )
    return f"{rate}, {describe_budgets(row)}"
