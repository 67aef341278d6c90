"""The Users page's actions: create a user (key shown once), disable or enable one, give a key,
revoke or rotate one, set limits. The guard has checked the session and its CSRF token.

Each action is one of the admin CLI's queries, so it takes effect the same way: the `users` and
`api_keys` triggers NOTIFY every proxy, which drop what they cached within a second. Each is
logged with the admin token that did it (its public id; never a key).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from proxy.appkeys import DATABASE
from proxy.auth import issuing
from proxy.auth.apikeys import NewKey
from proxy.dashboard import forms, users
from proxy.dashboard.keys import PROXY, SESSION
from proxy.dashboard.render import error_page, redirect, render
from proxy.db import accounts
from proxy.db.connect import Connection, DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Refused(Exception):
    """The action cannot be done; `status` and the message say why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _run(request: web.Request, work: Callable[[Connection], Awaitable[T]]) -> T:
    return await request.app[PROXY][DATABASE].run(work)


def _act(
    action: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Answer bad input with the Users page and its error (400/404/409), an outage with 503."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await action(request)
        except forms.FormError as exc:
            return await users.page(request, error=str(exc), status=400)
        except _Refused as exc:
            return await users.page(request, error=str(exc), status=exc.status)
        except DatabaseUnavailable as exc:
            return error_page(request, 503, f"{exc}. Nothing was changed; try again.")

    handler.__doc__ = action.__doc__
    return handler


def _done(request: web.Request, notice: str, what: str, *args: object) -> web.StreamResponse:
    log.info("dashboard: admin token %s " + what, request[SESSION].token_id, *args)
    request[SESSION].notices.append(notice)
    return redirect("/users")


def _show_key(request: web.Request, username: str, key: NewKey, headline: str) -> web.Response:
    """The one time a key is shown."""
    return render(request, "key.html", username=username, key=key, headline=headline)


@_act
async def create_user(request: web.Request) -> web.StreamResponse:
    """A new user with a first key, shown once."""
    form = await request.post()
    name = forms.username(str(form.get("username", "")))
    label = forms.label(form)
    expires_in = forms.EXPIRIES[forms.choice(form, "expires", forms.EXPIRIES)]

    async def work(con: Connection) -> NewKey:
        async with con.transaction():
            try:
                user = await accounts.create_user(con, name, None, None)
            except accounts.DuplicateUser:
                raise _Refused(409, f"A user named {name} already exists.") from None
            return await issuing.issue_key(con, user["id"], label, expires_in)

    key = await _run(request, work)
    log.info("dashboard: admin token %s created user %s", request[SESSION].token_id, name)
    return _show_key(request, name, key, f"Created user {name}")


async def _user(request: web.Request) -> str:
    return forms.username(request.match_info["username"])


def _no_user(name: str) -> _Refused:
    return _Refused(404, f"There is no user named {name}.")


@_act
async def disable_user(request: web.Request) -> web.StreamResponse:
    """Refuse all of a user's keys, on every proxy, within a second."""
    name = await _user(request)
    if not await _run(request, lambda con: accounts.set_user_enabled(con, name, False)):
        raise _no_user(name)
    notice = f"Disabled {name}: their keys are refused on every proxy within a second."
    return _done(request, notice, "disabled user %s", name)


@_act
async def enable_user(request: web.Request) -> web.StreamResponse:
    """Let a disabled user's keys work again."""
    name = await _user(request)
    if not await _run(request, lambda con: accounts.set_user_enabled(con, name, True)):
        raise _no_user(name)
    return _done(request, f"Enabled {name}.", "enabled user %s", name)


@_act
async def create_key(request: web.Request) -> web.StreamResponse:
    """Another key for a user, shown once."""
    name = await _user(request)
    form = await request.post()
    label = forms.label(form)
    expires_in = forms.EXPIRIES[forms.choice(form, "expires", forms.EXPIRIES)]

    async def work(con: Connection) -> NewKey:
        user = await accounts.get_user(con, name)
        if user is None:
            raise _no_user(name)
        return await issuing.issue_key(con, user["id"], label, expires_in)

    key = await _run(request, work)
    log.info("dashboard: admin token %s made key %s for %s", request[SESSION].token_id,
             key.key_id, name)  # fmt: skip
    return _show_key(request, name, key, f"A new key for {name}")


@_act
async def set_limits(request: web.Request) -> web.StreamResponse:
    """Set every limit override of a user (blank: the proxy's setting, or no quota)."""
    name = await _user(request)
    limits = forms.limits(await request.post())
    if await _run(request, lambda con: accounts.set_user_limits(con, name, limits)) is None:
        raise _no_user(name)
    notice = f"Saved {name}'s limits; every proxy applies them within a second."
    return _done(request, notice, "set the limits of %s", name)


async def _key(request: web.Request) -> str:
    return forms.key_id(request.match_info["key_id"])


@_act
async def revoke_key(request: web.Request) -> web.StreamResponse:
    """Revoke a key at once."""
    key_id = await _key(request)

    async def work(con: Connection) -> bool:
        if await accounts.get_key_owner(con, key_id) is None:
            raise _Refused(404, f"There is no key with id {key_id}.")
        return await accounts.revoke_key(con, key_id)

    if not await _run(request, work):
        request[SESSION].notices.append(f"Key {key_id} was already revoked.")
        return redirect("/users")
    notice = f"Revoked key {key_id}: every proxy refuses it within a second."
    return _done(request, notice, "revoked key %s", key_id)


@_act
async def rotate_key(request: web.Request) -> web.StreamResponse:
    """A new key in place of an old one, which stops now or after a grace period."""
    key_id = await _key(request)
    grace_name = forms.choice(await request.post(), "grace", forms.GRACES)
    grace = forms.GRACES[grace_name]
    try:
        name, key = await _run(request, lambda con: issuing.rotate_key(con, key_id, grace, None))
    except issuing.KeyNotFound:
        raise _Refused(404, f"There is no key with id {key_id}.") from None
    except issuing.KeyAlreadyRevoked:
        raise _Refused(409, f"Key {key_id} is revoked already: give a new key instead.") from None
    log.info("dashboard: admin token %s rotated key %s of %s into %s", request[SESSION].token_id,
             key_id, name, key.key_id)  # fmt: skip
    when = "now" if not grace else f"in {grace_name}"
    return _show_key(
        request, name, key, f"Key {key_id} of {name} replaced; it stops working {when}"
    )
