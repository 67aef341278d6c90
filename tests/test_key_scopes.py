"""Scoped keys: a key limited to some models (names or globs) and some APIs is refused with 403
in each API's own shape outside its scope, spending nothing; other keys keep full access.

Driven by the real `openai` and `anthropic` SDKs and plain HTTP against a fake backend; the admin
CLI makes and lists scoped keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from proxy.auth.issuing import issue_key, rotate_key
from proxy.db import accounts
from proxy.routes import APIS
from tests.cli_helpers import KEY_RE, failure, ok
from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import BACKEND_KEY, Harness, bearer, running_proxy
from tests.sharing_helpers import set_limits

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        harness.upstream.event_delay = harness.upstream.tail_delay = 0.0
        yield harness


async def scoped_key(
    proxy: Harness,
    username: str,
    models: list[str] | None = None,
    apis: list[str] | None = None,
    rate_limit: int | None = None,
) -> str:
    con = await asyncpg.connect(proxy.dsn)
    try:
        user = await accounts.get_user(con, username)
        if user is None:
            user = await accounts.create_user(
                con, username, rate_limit, 3600 if rate_limit else None
            )
        key = await issue_key(con, user["id"], None, None, models, apis)
    finally:
        await con.close()
    return key.full.reveal()


def _openai(proxy: Harness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url("/v1"), api_key=key, max_retries=0, timeout=10)


async def post(proxy: Harness, path: str, key: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url(path), json=body, headers=bearer(key)) as r,
    ):
        raw = await r.read()
        return r.status, json.loads(raw) if raw.startswith(b"{") else raw


def _refused_openai(body: dict[str, Any], param: str | None) -> None:
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["code"] == "key_out_of_scope"
    assert body["error"]["param"] == param


async def test_a_key_scoped_to_other_models_is_refused_on_every_api(proxy: Harness) -> None:
    key = await scoped_key(proxy, "alice", models=["qwen*", "llama-3-8b"])
    async with _openai(proxy, key) as client:
        with pytest.raises(openai.PermissionDeniedError) as chat:
            await client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as answer:
            await client.responses.create(model=MODEL, input="Hi")
    _refused_openai(chat.value.response.json(), "model")
    assert "qwen*, llama-3-8b" in chat.value.message
    _refused_openai(answer.value.response.json(), "model")

    for path, body in (
        ("/v1/completions", {"model": MODEL, "prompt": "Hi"}),
        ("/v1/embeddings", {"model": MODEL, "input": "Hi"}),
        ("/v1/chat/completions", {"messages": HI}),  # no model named: the default is asked
    ):
        status, refused = await post(proxy, path, key, body)
        assert status == 403, (path, refused)
        _refused_openai(refused, "model")

    async with anthropic.AsyncAnthropic(base_url=proxy.url("/"), api_key=key, max_retries=0) as c:
        with pytest.raises(anthropic.PermissionDeniedError) as message:
            await c.messages.create(model=MODEL, max_tokens=20, messages=HI)  # type: ignore[arg-type]
    assert message.value.body["error"]["type"] == "permission_error"  # type: ignore[index]

    status, rpc = await post(
        proxy,
        "/rpc",
        key,
        {"jsonrpc": "2.0", "method": "create_message", "params": {"message": "Hi"}, "id": 1},
    )
    assert status == 200  # a call's error is an answer like any other
    assert rpc["error"]["code"] == -32008
    assert rpc["error"]["data"] == {"status": 403, "code": "key_out_of_scope", "param": "model"}

    status, raw = await post(proxy, "/stream", key, {"message": "Hi"})
    assert status == 403  # and one `data: {"error": ...}` event, as /stream's errors are
    assert json.loads(raw.removeprefix(b"data: "))["code"] == "key_out_of_scope"

    # None of it reached the backend; each refusal is a row of its own.
    assert not [s for s in proxy.upstream.seen if s.path != "/v1/models"]
    rows = await proxy.wait_for_records(8)  # the 8 requests above
    assert len(rows) == 8
    assert {(r.status_code, r.error) for r in rows} == {(403, "key_out_of_scope")}


async def test_a_key_scoped_to_matching_models_is_served(proxy: Harness) -> None:
    key = await scoped_key(proxy, "alice", models=["smollm2-*"])
    async with _openai(proxy, key) as client:
        answer = await client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
        status, _ = await post(proxy, "/v1/chat/completions", key, {"messages": HI})
        assert status == 200  # the default model is smollm2-test, which the glob matches


async def test_a_key_scoped_to_an_api_is_refused_every_other_api(proxy: Harness) -> None:
    key = await scoped_key(proxy, "ci", apis=["embeddings"])
    status, embedded = await post(proxy, "/v1/embeddings", key, {"model": MODEL, "input": "Hi"})
    assert status == 200, embedded

    refused = {
        "/v1/chat/completions": {"model": MODEL, "messages": HI},
        "/v1/completions": {"model": MODEL, "prompt": "Hi"},
        "/v1/responses": {"model": MODEL, "input": "Hi"},
        "/stream": {"message": "Hi"},
        "/setModel": {"model": MODEL},
    }
    for path, body in refused.items():
        status, answer = await post(proxy, path, key, body)
        assert status == 403, (path, answer)
        assert "the embeddings" not in str(answer)
        assert "may use embeddings" in str(answer)

    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy.url("/v1/models"), headers=bearer(key)) as models,
    ):
        assert models.status == 403
        _refused_openai(await models.json(), None)

    status, message = await post(
        proxy, "/v1/messages", key, {"model": MODEL, "max_tokens": 5, "messages": HI}
    )
    assert status == 403
    assert message["type"] == "error"
    assert message["error"] == {"type": "permission_error", "message": message["error"]["message"]}
    assert "may use embeddings" in message["error"]["message"]
    status, rpc = await post(proxy, "/rpc", key, {"jsonrpc": "2.0", "method": "tool_list", "id": 1})
    assert status == 403
    assert rpc["error"]["code"] == -32008
    assert rpc["id"] is None


async def test_a_read_only_key_lists_models_and_nothing_more(proxy: Harness) -> None:
    key = await scoped_key(proxy, "dash", apis=["models"])
    async with _openai(proxy, key) as client:
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]


async def test_a_refusal_spends_nothing_of_the_users_limits(proxy: Harness) -> None:
    # One request an hour: the refused ones before it must not use it up.
    scoped = await scoped_key(proxy, "bob", models=["qwen*"], rate_limit=1)
    for _ in range(3):
        status, _ = await post(proxy, "/v1/chat/completions", scoped, {"messages": HI})
        assert status == 403
    full = await scoped_key(proxy, "bob")  # another key of bob's, unscoped: all of it
    status, answer = await post(proxy, "/v1/chat/completions", full, {"messages": HI})
    assert status == 200, answer
    status, answer = await post(proxy, "/v1/chat/completions", full, {"messages": HI})
    assert status == 429, answer


async def test_rotating_a_key_keeps_its_scope(proxy: Harness) -> None:
    key = await scoped_key(proxy, "carol", models=["qwen*"], apis=["chat"])
    con = await asyncpg.connect(proxy.dsn)
    try:
        _, new = await rotate_key(con, key.split("_")[1], timedelta(0), None)
    finally:
        await con.close()
    status, answer = await post(proxy, "/v1/embeddings", new.full.reveal(), {"input": "Hi"})
    assert status == 403
    assert "may use chat" in answer["error"]["message"]


def test_cli_creates_and_lists_scoped_keys(cli_env: dict[str, str]) -> None:
    ok(cli_env, "create-user", "--username", "erin")
    out = ok(
        cli_env, "create-key", "--username", "erin", "--models", "qwen*,smollm2",
        "--models", "phi3", "--apis", "chat", "--apis", "embeddings,models",
    )  # fmt: skip
    assert KEY_RE.search(out)
    assert "Scope: models qwen*, smollm2, phi3; APIs chat, embeddings, models." in out
    listed = ok(cli_env, "list-keys", "--username", "erin")
    assert "models=qwen*,smollm2,phi3 apis=chat,embeddings,models" in listed
    assert "  all" in listed  # the first key, made with the user, has no scope
    as_json = json.loads(ok(cli_env, "list-keys", "--username", "erin", "--json"))
    assert [k["apis"] for k in as_json] == [None, ["chat", "embeddings", "models"]]

    error = failure(cli_env, "create-key", "--username", "erin", "--apis", "chat,bogus")
    assert "bogus: not an API here; choose from " + ", ".join(APIS) in error
    helped = ok(cli_env, "create-key", "--help")
    assert all(name in helped for name in APIS)


# -- GET /v1/me ----------------------------------------------------------------------------------


async def _me(proxy: Harness, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy.url("/v1/me"), headers=bearer(key)) as r,
    ):
        return r.status, await r.json(), dict(r.headers)


async def test_me_shows_a_users_own_limits_quotas_and_usage_as_the_cli_does(
    proxy: Harness, cli_env: dict[str, str]
) -> None:
    alice = await scoped_key(proxy, "alice")
    await set_limits(proxy.dsn, "alice", tokens_per_day=5000, max_concurrent=2)
    bob = await scoped_key(proxy, "bob")
    for key in (alice, alice, bob):
        status, _ = await post(proxy, "/v1/chat/completions", key, {"messages": HI})
        assert status == 200
    deadline = time.monotonic() + 10
    while True:  # the rows reach Postgres about a second after their requests end
        status, me, _ = await _me(proxy, alice)
        assert status == 200
        if (me["usage"] and me["usage"][0]["requests"] >= 2) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    # Each /v1/me is a request too: let the last one's row land, then ask the CLI, then /v1/me.
    await asyncio.sleep(2.5)
    cli_usage = json.loads(
        await asyncio.to_thread(ok, cli_env, "usage", "--user", "alice", "--json")
    )
    cli_quotas = json.loads(
        await asyncio.to_thread(ok, cli_env, "usage", "--user", "alice", "--quotas", "--json")
    )
    status, me, headers = await _me(proxy, alice)
    assert status == 200

    assert me["username"] == "alice"
    assert me["limits"] == {
        "requests_per_window": 60, "window_seconds": 60, "max_concurrent": 2,
        "max_tokens": 1024, "tokens_per_day": 5000, "tokens_per_minute": None,
    }  # fmt: skip
    assert "x-ratelimit-remaining-requests" in {h.lower() for h in headers}
    # The same as the admin's `llama-gate usage --user alice`, and nothing of bob's.
    assert me["usage"] == cli_usage
    assert [row["username"] for row in me["usage"]] == ["alice"]
    assert me["usage"][0]["requests"] >= 3  # two chats and the /v1/me calls before this one
    resets = me["quotas"].pop("day_resets_at")
    assert [{"username": "alice", **me["quotas"]}] == cli_quotas
    assert me["quotas"]["tokens_today"] > 0
    # Counts and sums read as whole numbers in both (52, not 52.0); percentiles keep decimals.
    for row in (me["usage"][0], cli_usage[0], me["quotas"], cli_quotas[0]):
        assert all(type(row[n]) is int for n in ("requests", "prompt_tokens", "tokens_today")
                   if n in row), row  # fmt: skip
    assert resets.endswith("T00:00:00+00:00")
    assert me["key"] == {
        "id": alice.split("_")[1],
        "models": None,
        "apis": None,
        "requests_per_window": None,  # no limits of its own
        "window_seconds": None,
        "budgets": [],
    }
    assert me["groups"] == []


async def test_me_answers_any_key_whatever_its_scope(proxy: Harness) -> None:
    key = await scoped_key(proxy, "ci", models=["nomic*"], apis=["embeddings"])
    status, me, _ = await _me(proxy, key)
    assert status == 200
    assert me["key"]["models"] == ["nomic*"]
    assert me["key"]["apis"] == ["embeddings"]
    assert me["usage"] == []
    async with aiohttp.ClientSession() as http, http.get(proxy.url("/v1/me")) as r:
        assert r.status == 401


async def test_a_key_scoped_to_models_lists_and_retrieves_only_those(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, models=[MODEL, "qwen-7b", "qwen-14b"])
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await scoped_key(proxy, "alice", models=["qwen-7*"])
        full = await scoped_key(proxy, "alice")
        async with _openai(proxy, key) as client, _openai(proxy, full) as unscoped:
            assert [m.id for m in (await client.models.list()).data] == ["qwen-7b"]
            assert (await client.models.retrieve("qwen-7b")).id == "qwen-7b"
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await client.models.retrieve(MODEL)
            listed = [m.id for m in (await unscoped.models.list()).data]
        _refused_openai(refused.value.response.json(), "model")
        assert listed == [MODEL, "qwen-7b", "qwen-14b"]


async def test_a_model_scoped_key_is_refused_where_the_answering_model_cannot_be_checked(
    db_dsn: str, tmp_path: Path
) -> None:
    # A plain llama_cpp.server (no /health) lists no models, and answers any name it does not
    # know with its own model: a key limited to some models cannot be held to them there.
    upstream = FakeUpstream(expected_key=BACKEND_KEY, plain=True)
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await scoped_key(proxy, "alice", models=["smollm2-*"])
        for body in ({"messages": HI}, {"model": MODEL, "messages": HI}):
            status, refused = await post(proxy, "/v1/chat/completions", key, body)
            assert status == 403, refused
            _refused_openai(refused, "model")
        assert "may not use a model it does not name" in str(await post(
            proxy, "/v1/chat/completions", key, {"messages": HI}
        ))  # fmt: skip
        assert "does not list its models" in refused["error"]["message"]
        full = await scoped_key(proxy, "alice")
        status, _ = await post(proxy, "/v1/chat/completions", full, {"messages": HI})
        assert status == 200  # an unscoped key is served as before
        assert not [s for s in upstream.seen if s.path == "/v1/chat/completions"][1:]


async def test_a_request_naming_no_model_is_asked_of_the_model_it_was_checked_against(
    db_dsn: str, tmp_path: Path
) -> None:
    """Two backends with different defaults: the key's request names none, is checked against
    the default (x-model) and must be answered by it, whichever backend takes it."""
    other = FakeUpstream(expected_key=BACKEND_KEY, models=["y-secret", "x-model"])
    await other.start()
    try:
        first = FakeUpstream(expected_key=BACKEND_KEY, models=["x-model"])
        await first.start()
        urls = f"http://127.0.0.1:{first.port},http://127.0.0.1:{other.port}"
        await first.stop()  # running_proxy starts it again
        async with running_proxy(db_dsn, tmp_path, first, LLAMA_SERVER_URLS=urls) as proxy:
            key = await scoped_key(proxy, "alice", models=["x-*"])
            for _ in range(4):
                status, answer = await post(proxy, "/v1/chat/completions", key, {"messages": HI})
                assert status == 200, answer
            asked = [
                json.loads(seen.body)["model"]
                for upstream in (first, other)
                for seen in upstream.seen
                if seen.path == "/v1/chat/completions"
            ]
    finally:
        await other.stop()
    assert asked == ["x-model"] * 4


async def test_set_model_cannot_choose_a_model_outside_the_keys_scope(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, models=[MODEL, "secret-70b"])
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await scoped_key(proxy, "alice", models=["smollm2-*"])
        status, answer = await post(proxy, "/setModel", key, {"modelName": "secret-70b"})
        # Not among the models this key may use, whose names are all it learns: as if absent.
        assert status == 404, answer
        assert answer["code"] == "model_not_found"
        assert answer["models"] == [MODEL]
        status, _ = await post(proxy, "/setModel", key, {"modelName": MODEL})
        assert status == 200


def test_cli_refuses_an_empty_scope_rather_than_making_a_full_key(cli_env: dict[str, str]) -> None:
    ok(cli_env, "create-user", "--username", "erin")
    for option in ("--models", "--apis"):
        for empty in ("", " , "):
            error = failure(cli_env, "create-key", "--username", "erin", option, empty)
            assert f"{option} was given no names" in error
    listed = json.loads(ok(cli_env, "list-keys", "--username", "erin", "--json"))
    assert len(listed) == 1  # only the key made with the user


async def test_me_shows_none_of_a_deleted_namesakes_rows(proxy: Harness) -> None:
    old = await scoped_key(proxy, "alice")
    for _ in range(3):
        status, _ = await post(proxy, "/v1/chat/completions", old, {"messages": HI})
        assert status == 200
    await proxy.wait_for_records(3)
    await asyncio.sleep(2)  # the rows reach Postgres
    con = await asyncpg.connect(proxy.dsn)
    try:
        assert await accounts.delete_user(con, "alice")
    finally:
        await con.close()
    new = await scoped_key(proxy, "alice")  # another alice: the audit rows keep the old name
    status, me, _ = await _me(proxy, new)
    assert status == 200
    assert me["usage"] == []


async def test_a_key_limited_to_some_models_never_learns_the_others_names(
    db_dsn: str, tmp_path: Path
) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, models=[MODEL, "qwen-7b", "secret-70b"])
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await scoped_key(proxy, "alice", models=["qwen-*"])
        status, rpc = await post(
            proxy, "/rpc", key, {"jsonrpc": "2.0", "method": "list_models", "id": 1}
        )
        assert status == 200
        assert rpc["result"]["models"] == ["qwen-7b"]
        body = {"model": "qwen-missing", "messages": HI}
        status, missing = await post(proxy, "/v1/chat/completions", key, body)
        assert status == 404
        assert "secret-70b" not in missing["error"]["message"]
        assert "qwen-7b" in missing["error"]["message"]
