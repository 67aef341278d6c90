"""GET /v1/me: a key's holder sees their own limits, token quotas and usage, without an admin.

What it shows agrees with the admin's `llama-gate usage --user NAME`: `usage` is `usage --user NAME
--json` (the last 30 days, the llama_usage_daily view's figures, but of this user's own rows, by
user id: a user made again under a deleted user's name sees none of theirs), `quotas` the user's row
of `usage --quotas`, with when the daily quota resets (UTC midnight; the per-minute one is a
sliding minute). `limits` are those that apply (the user's own or the defaults), `key` the key
used and its scope. Any key may ask, whatever its scope: it only ever shows its own user.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

from proxy.appkeys import ADMISSION, DATABASE
from proxy.db import limits, usage
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.numbers import plain_number
from proxy.dialects.openai import DIALECT
from proxy.dialects.wire import json_bytes
from proxy.errors import ApiError
from proxy.pipeline.endpoint import CallerLimits, Context, Prepared

USAGE_DAYS = 30  # as `llama-gate usage` shows by default


class UsageUnavailable(ApiError):
    status = 503
    code = "usage_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "Your usage cannot be read right now (the database is unreachable); try again shortly.",
            {"Retry-After": "5"},
        )


class Me:
    dialect = DIALECT
    reads_body = False
    prompt_param: str | None = None

    def check(self, raw: bytes | None, limits: CallerLimits) -> Prepared:
        return Prepared(None, None)

    async def serve(self, context: Context, prepared: Prepared) -> web.StreamResponse:
        app = context.delivery.request.app
        caller = context.caller
        now = datetime.now(UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        since = (now - timedelta(days=USAGE_DAYS)).date()

        async def read(con: Connection) -> tuple[list[Any], list[Any], list[Any], Any]:
            # By user id: a namesake of a deleted user never sees that user's rows.
            daily = await usage.user_usage_daily(con, since, caller.user_id)
            quotas = await usage.quota_usage(
                con, day_start, now - timedelta(minutes=1), caller.username
            )
            member_of = await limits.groups_of(con, caller.user_id)
            return daily, quotas, member_of, await limits.key_limits(con, caller.key_id)

        try:
            daily, quotas, member_of, key = await app[DATABASE].run(read)
        except DatabaseUnavailable:
            raise UsageUnavailable() from None
        quota = dict(quotas[0]) if quotas else {}
        quota.pop("username", None)
        quota["day_resets_at"] = day_start + timedelta(days=1)
        answer = {
            "object": "user",
            "username": caller.username,
            "key": {
                "id": caller.key_id,
                "models": list(caller.models) if caller.models is not None else None,
                "apis": sorted(caller.apis) if caller.apis is not None else None,
                # The key's own limits, beside the user's (None: none).
                "requests_per_window": key["rate_limit"] if key else None,
                "window_seconds": key["rate_window_seconds"] if key else None,
                "budgets": [_plain(b) for b in limits.budgets_now(key)] if key else [],
            },
            "limits": app[ADMISSION].limits_of(caller),
            "quotas": _plain(quota),
            "usage": [_plain(dict(row)) for row in daily],
            # Each group's budgets: what the members used together in the current periods.
            "groups": [
                {
                    "name": group["name"],
                    "time_zone": group["time_zone"],
                    "requests_per_window": group["rate_limit"],
                    "window_seconds": group["rate_window_seconds"],
                    "max_concurrent": group["max_concurrent"],
                    "budgets": [_plain(b) for b in limits.budgets_now(group)],
                }
                for group in member_of
            ],
        }
        return context.delivery.whole(200, json_bytes(answer), "application/json")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON has it: dates in ISO form, sums and rounded percentiles as numbers."""
    plain: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime | date):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = plain_number(value)
        plain[name] = value
    return plain
