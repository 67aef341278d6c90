"""Stored Responses API answers, in Postgres (`llama_responses`), readable by their maker only.

`store` (true unless the request says false, as OpenAI's API) keeps a response for
LLAMA_PROXY_RESPONSES_RETENTION days (0: nothing is stored, `store` is accepted and ignored).
Each stored response keeps its own turn of the conversation as the chat messages it added (its
input's and its output's), so `previous_response_id` continues a conversation from any proxy
process by walking the chain back. Another user's id, a deleted or an expired one are all the
same: not found. `llama-gate prune-logs` deletes the expired.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import msgspec
from aiohttp import web

from proxy.appkeys import DATABASE, SETTINGS
from proxy.db import stored_responses
from proxy.db.connect import Connection, DatabaseUnavailable
from proxy.db.pool import Database
from proxy.dialects.wire import json_bytes
from proxy.errors import ApiError, ResponseNotFound

log = logging.getLogger(__name__)
T = TypeVar("T")
# What an id can be (the proxy's own are resp_ and 32 hex digits): anything else is no response,
# and never reaches Postgres (which cannot even hold some of it, a NUL).
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class StoreUnavailable(ApiError):
    status = 503
    code = "responses_store_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "Stored responses cannot be read right now (the database is unreachable); try again "
            "shortly, or send the whole conversation as input instead of previous_response_id.",
            {"Retry-After": "5"},
        )


class ResponseStore:
    def __init__(self, database: Database, retention_days: int) -> None:
        self._database = database
        self._retention = timedelta(days=retention_days)

    @classmethod
    def of(cls, app: web.Application) -> ResponseStore:
        return cls(app[DATABASE], app[SETTINGS].responses_retention_days)

    @property
    def enabled(self) -> bool:
        return self._retention > timedelta(0)

    async def keep(
        self,
        user_id: int,
        response: dict[str, Any],
        input_items: list[Any],
        messages: list[dict[str, Any]],
    ) -> None:
        """Store `response`; a database that cannot take it is logged, not the client's failure
        (the answer itself was made and is sent)."""
        now = datetime.now(UTC)
        # Postgres' jsonb cannot hold a NUL, not even escaped: stored as U+FFFD, as audit rows are
        texts = [
            json_bytes(_without_nul(value)).decode()  # any integer a body holds
            for value in (input_items, messages, response)
        ]
        try:
            await self._database.run(
                lambda con: stored_responses.store_response(
                    con, response["id"], user_id, now + self._retention,
                    response.get("previous_response_id"), *texts,
                )
            )  # fmt: skip
        except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
            log.warning("response %s was answered but not stored: %s", response["id"], exc)

    async def conversation(self, user_id: int, response_id: str) -> list[dict[str, Any]]:
        """The chat messages of the conversation up to and including `response_id`."""
        _known_shape(response_id, "previous_response_id")
        now = datetime.now(UTC)
        turns = await self._query(
            lambda con: stored_responses.response_conversation(con, response_id, user_id, now)
        )
        if turns is None:
            raise ResponseNotFound(response_id, "previous_response_id")
        first, messages = turns
        if first is not None:  # an earlier turn is gone (deleted, or past its retention)
            raise ResponseNotFound(first, "previous_response_id")
        return [message for turn in messages for message in msgspec.json.decode(turn)]

    async def read(self, user_id: int, response_id: str) -> tuple[dict[str, Any], list[Any]]:
        """The stored response and its input items."""
        _known_shape(response_id)
        now = datetime.now(UTC)
        row = await self._query(
            lambda con: stored_responses.stored_response(con, response_id, user_id, now)
        )
        if row is None:
            raise ResponseNotFound(response_id)
        # msgspec: integers of any length, as they were sent and stored (orjson: floats)
        return msgspec.json.decode(row["response"]), msgspec.json.decode(row["input_items"])

    async def delete(self, user_id: int, response_id: str) -> None:
        _known_shape(response_id)
        now = datetime.now(UTC)
        if not await self._query(
            lambda con: stored_responses.delete_response(con, response_id, user_id, now)
        ):
            raise ResponseNotFound(response_id)

    async def _query(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """`work`'s answer from Postgres; `StoreUnavailable` (a 503) when it cannot be had."""
        try:
            return await self._database.run(work)
        except DatabaseUnavailable:
            raise StoreUnavailable() from None


def _known_shape(response_id: str, param: str | None = None) -> None:
    if not _ID.fullmatch(response_id):
        raise ResponseNotFound(response_id, param)


def _without_nul(value: Any) -> Any:
    """`value` with each NUL in its texts (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value
