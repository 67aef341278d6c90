"""JSON-RPC 2.0 at POST /rpc against the specification, case by case: ids, notifications,
batches, every error code, the server errors with what a client needs, and each call admitted,
limited and recorded alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.appkeys import BACKENDS, COMPLETION_HOOKS
from proxy.audit.row import AuditRow
from proxy.upstream.backends import Backends
from tests.fake_upstream import MODEL, FakeUpstream
from tests.proxy_harness import (
    BACKEND_KEY,
    Harness,
    bearer,
    make_user,
    proxy_settings,
    random_key,
    running_proxy,
)
from tests.sharing_helpers import set_limits

HELLO = {"message": "Hi"}


def call(method: str = "create_message", params: Any = None, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, **fields}
    if params is not None:
        request["params"] = params
    return request


async def rpc(
    proxy: Harness | str, key: str | None, payload: Any = None, raw: bytes | None = None
) -> tuple[int, Any, dict[str, str]]:
    """POST to /rpc; the HTTP status, the JSON body (None when there is none) and the headers."""
    data = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **(bearer(key) if key else {})}
    url = proxy.url("/rpc") if isinstance(proxy, Harness) else proxy
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data=data, headers=headers) as r,
    ):
        text = await r.read()
        return r.status, json.loads(text) if text else None, dict(r.headers)


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


def chats(proxy: Harness) -> list[dict[str, Any]]:
    """The chat requests the backend received, as JSON."""
    return [json.loads(s.body) for s in proxy.upstream.seen if s.path == "/v1/chat/completions"]


# -- ids and notifications ---------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc-1", 7, 2.5, None])
async def test_a_call_answers_with_its_id_echoed(proxy: Harness, request_id: Any) -> None:
    key = await proxy.user("alice")
    status, body, headers = await rpc(proxy, key, call(params=HELLO, id=request_id))
    assert status == 200
    assert set(body) == {"jsonrpc", "result", "id"}
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == request_id
    assert type(body["id"]) is type(request_id)
    assert body["result"]["type"] == "final_text"
    assert body["result"]["content"] == "Hello world"
    assert "x-ratelimit-remaining-requests" in {h.lower() for h in headers}
    (row,) = await proxy.wait_for_records(1)
    assert (row.path, row.method, row.status_code) == ("/rpc", "create_message", 200)
    assert (row.prompt_tokens, row.completion_tokens) == (5, 2)
    assert row.username == "alice"
    assert row.response_bytes == int(headers["Content-Length"])  # the whole answer is its


async def test_a_notification_gets_no_response_but_is_served_and_recorded(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, call(params=HELLO))
    assert (status, body) == (204, None)
    assert len(chats(proxy)) == 1
    (row,) = await proxy.wait_for_records(1)
    assert (row.path, row.method, row.status_code) == ("/rpc", "create_message", 200)
    assert row.completion_tokens == 2


async def test_a_batch_of_notifications_only_is_an_empty_204(proxy: Harness) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, [call(params=HELLO), call("tool_list")])
    assert (status, body) == (204, None)
    rows = await proxy.wait_for_records(2)
    assert sorted(str(row.method) for row in rows) == ["create_message", "tool_list"]


async def test_a_batch_answers_each_request_in_order_and_records_each_call(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice")
    batch = [
        call(params=HELLO, id=1),
        call(params=HELLO),  # a notification: served, not answered
        call("tool_list", id="b"),
        call("list_models", params=[], id=3),
    ]
    status, body, _ = await rpc(proxy, key, batch)
    assert status == 200
    assert [answer["id"] for answer in body] == [1, "b", 3]
    assert body[0]["result"]["content"] == "Hello world"
    assert body[1]["result"] == {"tools": []}
    assert body[2]["result"]["models"] == [MODEL]
    assert len(chats(proxy)) == 2
    rows = await proxy.wait_for_records(4)
    assert [row.method for row in rows] == [
        "create_message",
        "create_message",
        "tool_list",
        "list_models",
    ]
    assert {row.path for row in rows} == {"/rpc"}
    assert len({row.request_id for row in rows}) == 4


# -- the errors of the specification -------------------------------------------------------------


async def test_an_empty_batch_is_one_invalid_request_error(proxy: Harness) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, [])
    assert status == 200
    assert body["id"] is None
    assert body["error"]["code"] == -32600
    assert "empty" in body["error"]["message"]
    (row,) = await proxy.wait_for_records(1)
    assert (row.path, row.method) == ("/rpc", "POST")


async def test_a_batch_past_a_hundred_calls_is_refused_whole_and_runs_none(proxy: Harness) -> None:
    key = await proxy.user("alice")
    call = {"jsonrpc": "2.0", "method": "tool_list", "id": 1}
    status, body, _ = await rpc(proxy, key, [call] * 100)
    assert status == 200
    assert len(body) == 100  # a hundred is fine
    status, body, _ = await rpc(proxy, key, [call] * 101)
    assert status == 200
    assert body["error"]["code"] == -32600
    assert "at most 100" in body["error"]["message"]
    rows = await proxy.wait_for_records(101)
    assert [row.method for row in rows].count("tool_list") == 100  # the refused batch ran none


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc": "2.0", "method": "tool_list", "id": 1',
        b"\xff\xfe",
        b"",
        b"[1,]",
        # a number no double holds: echoed in a history, it would be Infinity, which is no JSON
        b'{"jsonrpc": "2.0", "method": "create_message", "id": 1, "params": {"history": [{'
        b'"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": {"x": 1e400}'
        b"}]}]}}",
    ],
)
async def test_a_parse_error_is_32700_with_a_null_id(proxy: Harness, raw: bytes) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, raw=raw)
    assert status == 200
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == -32700
    assert "not valid JSON" in body["error"]["message"]
    (row,) = await proxy.wait_for_records(1)
    assert row.error == "invalid_json"


@pytest.mark.parametrize(
    ("sent", "answered_id"),
    [
        (1, None),
        ("call", None),
        ({"jsonrpc": "1.0", "method": "tool_list", "id": 4}, 4),
        ({"method": "tool_list", "id": 4}, 4),
        ({"jsonrpc": "2.0", "id": 5}, 5),
        ({"jsonrpc": "2.0", "method": 42, "id": 6}, 6),
        ({"jsonrpc": "2.0", "method": "tool_list", "id": {"a": 1}}, None),
        ({"jsonrpc": "2.0", "method": "tool_list", "id": True}, None),
        ({"jsonrpc": "2.0", "method": "tool_list", "params": "x", "id": 7}, 7),
    ],
)
async def test_an_invalid_request_object_is_32600(
    proxy: Harness, sent: Any, answered_id: Any
) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, sent)
    assert status == 200
    assert body["error"]["code"] == -32600
    assert body["id"] == answered_id
    assert proxy.upstream.seen == []


async def test_a_batch_of_invalid_requests_gets_one_error_each(proxy: Harness) -> None:
    key = await proxy.user("alice")
    status, body, _ = await rpc(proxy, key, [1, 2, 3])
    assert status == 200
    assert [(a["id"], a["error"]["code"]) for a in body] == [(None, -32600)] * 3


async def test_an_unknown_method_is_32601_recorded_and_spends_nothing(proxy: Harness) -> None:
    key = await proxy.user("alice", rate_limit=1)
    status, body, _ = await rpc(proxy, key, call("summon_dragon", id=9))
    assert (status, body["id"], body["error"]["code"]) == (200, 9, -32601)
    assert "create_message" in body["error"]["message"]
    (row,) = await proxy.wait_for_records(1)
    assert (row.method, row.status_code, row.error) == ("summon_dragon", 404, "method_not_found")
    # The refusal took nothing from the rate limit of one request.
    status, body, _ = await rpc(proxy, key, call(params=HELLO, id=10))
    assert "result" in body


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"message": "Hi", "temperature": "hot"}, "temperature"),
        ({"message": "Hi", "temperature": 9}, "temperature"),
        ({"message": "Hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"message": 3}, "message"),
        ({"history": [{"role": "robot", "content": "x"}], "message": "Hi"}, "history.0.role"),
        ({}, "message"),
        (
            {"tool_results": [{"tool_call_id": "nope", "content": "1"}]},
            "tool_results.0.tool_call_id",
        ),
        (["Hi"], "params"),
        ({"message": "Hi", "tool_choice": "required"}, "tool_choice"),
        ({"message": "Hi", "tools": [{"name": "bad name!"}]}, "tools.0.name"),
        ({"message": "Hi", "max_iterations": -1}, "max_iterations"),
    ],
)
async def test_invalid_params_are_32602_naming_the_param_and_spend_nothing(
    proxy: Harness, params: Any, param: str
) -> None:
    key = await proxy.user("alice", rate_limit=1)
    status, body, _ = await rpc(proxy, key, call(params=params, id=1))
    assert status == 200
    error = body["error"]
    assert error["code"] == -32602
    assert error["data"]["param"] == param
    assert param.split(".")[0] in error["message"]
    assert proxy.upstream.seen == []
    status, body, _ = await rpc(proxy, key, call(params=HELLO, id=2))
    assert "result" in body  # the rate limit of one was not spent on the refusal


async def test_an_unexpected_failure_is_32603_and_logged(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Backends):
        @asynccontextmanager
        async def acquire(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise RuntimeError("a bug")
            yield

    app = create_app(proxy_settings(db_dsn, 9, tmp_path))
    app[BACKENDS] = Broken(app[BACKENDS].upstreams)
    rows: list[AuditRow] = []
    app[COMPLETION_HOOKS].append(rows.append)
    _, key = await make_user(db_dsn, "alice")
    async with TestServer(app) as server:
        status, body, _ = await rpc(str(server.make_url("/rpc")), key, call(params=HELLO, id=1))
    assert status == 200
    assert body["error"]["code"] == -32603
    assert "logged" in body["error"]["message"]
    assert "a bug" not in json.dumps(body)
    assert "a bug" in caplog.text
    (row,) = rows
    assert (row.method, row.status_code) == ("create_message", 500)
    assert row.error is not None
    assert row.error.startswith("internal_error: The proxy failed unexpectedly")  # as elsewhere


# -- the server's own errors ----------------------------------------------------------------------


async def test_each_call_of_a_batch_is_rate_limited_alone(proxy: Harness) -> None:
    key = await proxy.user("alice", rate_limit=2, rate_window_seconds=60)
    batch = [call(params=HELLO, id=i) for i in range(3)]
    status, body, headers = await rpc(proxy, key, batch)
    assert status == 200
    assert ["result" in answer for answer in body] == [True, True, False]
    error = body[2]["error"]
    assert error["code"] == -32000
    assert error["data"]["status"] == 429
    assert error["data"]["retry_after"] >= 1
    assert error["data"]["retry_after_ms"] > 0
    assert "Rate limit reached" in error["message"]
    assert len(chats(proxy)) == 2
    rows = await proxy.wait_for_records(3)
    assert [row.status_code for row in rows] == [200, 200, 429]
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_spent_token_quota_is_32001_with_retry_after(proxy: Harness) -> None:
    key = await proxy.user("alice")
    # Each call's prompt is 5 tokens: the first fits (its answer's room lowered to what is
    # left) and uses 7; the second's prompt no longer fits what is left.
    await set_limits(proxy.dsn, "alice", tokens_per_day=10)
    status, body, _ = await rpc(proxy, key, [call(params=HELLO, id=1), call(params=HELLO, id=2)])
    assert status == 200
    assert "result" in body[0]
    error = body[1]["error"]
    assert error["code"] == -32001
    assert error["data"]["retry_after"] >= 1
    assert "Token quota reached" in error["message"]


async def test_a_queue_timeout_is_32002_with_retry_after(db_dsn: str, tmp_path: Path) -> None:
    upstream = FakeUpstream(expected_key=BACKEND_KEY, gate=asyncio.Event())
    async with running_proxy(
        db_dsn, tmp_path, upstream, LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS="1"
    ) as proxy:
        alice, bob = await proxy.user("alice"), await proxy.user("bob")
        async with aiohttp.ClientSession() as client:
            body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
            holding = await client.post(
                proxy.url("/v1/chat/completions"), json=body, headers=bearer(alice)
            )
            await upstream.received.wait()
            status, answer, _ = await rpc(proxy, bob, call(params=HELLO, id=1))
            assert upstream.gate is not None
            upstream.gate.set()
            await holding.read()
            holding.release()
    assert status == 200
    error = answer["error"]
    assert error["code"] == -32002
    assert error["data"]["status"] == 503
    assert error["data"]["retry_after"] >= 1


async def test_an_unreachable_backend_is_32003_with_retry_after(proxy: Harness) -> None:
    key = await proxy.user("alice")
    await proxy.upstream.stop()
    status, body, _ = await rpc(proxy, key, call(params=HELLO, id=1))
    assert status == 200
    error = body["error"]
    assert error["code"] == -32003
    assert error["data"]["retry_after"] == 5
    assert "not reachable" in error["message"]


async def test_an_unknown_model_is_32004_listing_the_models_and_spends_nothing(
    proxy: Harness,
) -> None:
    key = await proxy.user("alice", rate_limit=1)
    params = {**HELLO, "model": "gpt-9"}
    status, body, _ = await rpc(proxy, key, call(params=params, id=1))
    error = body["error"]
    assert error["code"] == -32004
    assert error["data"]["models"] == [MODEL]
    assert error["data"]["param"] == "model"
    assert proxy.upstream.seen == []
    status, body, _ = await rpc(proxy, key, call(params=HELLO, id=2))
    assert (status, "result" in body) == (200, True)


@pytest.mark.parametrize("key", [None, "lgk_short", "random"])
async def test_a_missing_or_bad_key_is_http_401_with_a_jsonrpc_error(
    proxy: Harness, key: str | None
) -> None:
    presented = random_key() if key == "random" else key
    status, body, headers = await rpc(proxy, presented, call(params=HELLO, id=1))
    assert status == 401
    assert headers["WWW-Authenticate"] == "Bearer"
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == -32005
    assert "Invalid API key" in body["error"]["message"]
    (row,) = await proxy.wait_for_records(1)
    assert (row.path, row.status_code) == ("/rpc", 401)


async def test_a_body_over_the_cap_is_http_413_with_a_jsonrpc_error(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_BODY_BYTES="200") as proxy:
        key = await proxy.user("alice")
        status, body, _ = await rpc(proxy, key, call(params={"message": "x" * 300}, id=1))
    assert status == 413
    assert body["error"]["code"] == -32600
    assert body["id"] is None


async def test_the_other_methods_list_tools_and_models(proxy: Harness) -> None:
    key = await proxy.user("alice")
    batch = [call("tool_list", id=1), call("list_models", id=2), call("tool_list", {"x": 1}, id=3)]
    status, body, _ = await rpc(proxy, key, batch)
    assert status == 200
    assert body[0]["result"] == {"tools": []}
    assert body[1]["result"] == {"models": [MODEL], "default": MODEL, "your_default": None}
    assert body[2]["error"]["code"] == -32602
    assert body[2]["error"]["data"]["param"] == "x"


# -- anything a client may send -------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no others
rpc_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
rpc_requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2]),
        "method": st.sampled_from(["create_message", "tool_list", "list_models", "nope", 3]),
        "params": st.one_of(
            rpc_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "message": rpc_values | st.just("Hi"),
                    "history": rpc_values,
                    "tools": rpc_values,
                    "tool_results": rpc_values,
                    "max_new_tokens": rpc_values,
                    "temperature": rpc_values,
                    "model": rpc_values,
                    "max_iterations": rpc_values,
                    "tool_choice": rpc_values,
                },
            ),
        ),
        "id": rpc_values,
    },
)
rpc_bodies = st.one_of(rpc_requests, st.lists(rpc_requests | rpc_values, max_size=4), rpc_values)


async def test_any_json_gets_a_conforming_answer_and_never_a_server_failure(
    proxy: Harness,
) -> None:
    key = await proxy.user("fuzz", rate_limit=1_000_000)
    loop = asyncio.get_running_loop()

    def check(answer: Any, sent: Any) -> None:
        assert answer["jsonrpc"] == "2.0"
        assert ("result" in answer) != ("error" in answer)
        if "error" in answer:
            assert -32700 <= answer["error"]["code"] <= -32000
            assert answer["error"]["code"] != -32603, answer
            assert isinstance(answer["error"]["message"], str)
        ids = [r.get("id") for r in (sent if isinstance(sent, list) else [sent])
               if isinstance(r, dict)]  # fmt: skip
        assert answer["id"] is None or answer["id"] in ids

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rpc_bodies)
    def one(sent: Any) -> None:
        work = rpc(proxy, key, sent)
        status, body, _ = asyncio.run_coroutine_threadsafe(work, loop).result(30)
        assert status in (200, 204), (sent, status, body)
        if status == 204:
            assert body is None
            return
        for answer in body if isinstance(body, list) else [body]:
            check(answer, sent)
        if isinstance(sent, list) and sent:
            assert isinstance(body, list)

    await asyncio.to_thread(one)
