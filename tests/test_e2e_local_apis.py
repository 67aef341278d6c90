"""End to end with the real model: the proxy as a process, the real backend with SmolLM2 and its
prompt cache on (LLAMA_PROMPT_CACHE=1), Postgres for keys and audit rows.

Tool calls with tool_choice "required" through JSON-RPC and through the OpenAI API (streamed and
not), /stream, two users' own default models, and a conversation pre-warmed by /restore_cache
whose next turn finds its prompt cached."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from tests.backend_harness import DEFAULT, running_backend
from tests.proxy_harness import bearer, make_user, proxy_process

pytestmark = pytest.mark.slow

OTHER = "smol-other"  # the same GGUF under a second name
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
        "required": ["city"],
    },
}
OPENAI_WEATHER: Any = {"type": "function", "function": WEATHER}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@dataclass(frozen=True)
class Stack:
    url: str
    dsn: str
    keys: dict[str, str]
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)  # closed with the stack

    def client(self, user: str) -> openai.OpenAI:
        if user not in self.clients:
            self.clients[user] = openai.OpenAI(
                base_url=f"{self.url}/v1", api_key=self.keys[user], max_retries=0
            )
        return self.clients[user]

    def post(self, user: str, path: str, body: Any) -> tuple[int, bytes]:
        return asyncio.run(_post(f"{self.url}{path}", self.keys[user], body))

    def rpc(self, user: str, method: str, **params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
        status, raw = self.post(user, "/rpc", request)
        assert status == 200
        answer = json.loads(raw)
        assert "result" in answer, answer
        return answer["result"]


async def _post(url: str, key: str, body: Any) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.post(url, json=body, headers=bearer(key)) as r,
    ):
        return r.status, await r.read()


@pytest.fixture(scope="module")
def stack(module_db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {name: asyncio.run(make_user(module_db_dsn, name))[1] for name in ("alice", "bob")}
    home = tmp_path_factory.mktemp("local-apis-backend")
    with running_backend(home, OTHER, LLAMA_PROMPT_CACHE="1") as backend:
        environ = {
            "POSTGRES_AUTH_DSN": module_db_dsn,
            "LLAMA_GATE_HOME": str(tmp_path_factory.mktemp("local-apis-proxy")),
            "LLAMA_SERVER_HOST": "127.0.0.1",
            "LLAMA_SERVER_PORT": str(backend.port),
            "LLAMA_SERVER_API_KEY": backend.key,
            "LLAMA_PROXY_METRICS_PORT": "0",
        }
        with proxy_process(environ) as url:
            stack = Stack(url, module_db_dsn, keys)
            yield stack
            for client in stack.clients.values():
                client.close()


async def _rows(dsn: str, count: int, **match: Any) -> list[asyncpg.Record]:
    """The audit rows matching `match` (column = value), once `count` of them have landed."""
    where = " AND ".join(f"{column} = ${i}" for i, column in enumerate(match, start=1))
    deadline = time.monotonic() + 10
    con = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await con.fetch(
                f"SELECT * FROM llama_requests WHERE {where} ORDER BY id",
                *match.values(),
            )
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.1)
    finally:
        await con.close()


def _events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]


def test_required_gives_a_tool_call_through_json_rpc(stack: Stack) -> None:
    first = stack.rpc("alice", "create_message", message=ASK[0]["content"], tools=[WEATHER],
                      tool_choice="required", temperature=0, model=DEFAULT)  # fmt: skip
    assert first["type"] == "tool_calls"
    (called,) = first["tool_calls"]
    assert called["name"] == "get_weather"
    assert isinstance(called["arguments"]["city"], str)
    assert first["iteration_count"] == 1
    # The client runs the tool and sends the result back; required again, so the model must call:
    # the same call again is answered with a final text, another call is passed on.
    results = [{"tool_call_id": called["id"], "content": {"celsius": 18, "sky": "cloudy"}}]
    second = stack.rpc("alice", "create_message", history=first["history"], tools=[WEATHER],
                       tool_results=results, tool_choice="required", temperature=0,
                       model=DEFAULT)  # fmt: skip
    assert second["iteration_count"] == 2
    if second["type"] == "final_text":
        assert second["loop_guard"] == "repeated_tool_call"
        assert isinstance(second["content"], str)
    else:  # another call: well formed, and not the one already answered
        (again,) = second["tool_calls"]
        assert again["name"] == "get_weather"
        assert isinstance(again["arguments"]["city"], str)
        assert again["arguments"] != called["arguments"]
    print(f"\nrequired, then required after the result: {second['type']} {second['loop_guard']}")
    rows = asyncio.run(_rows(stack.dsn, 2, path="/rpc", username="alice"))
    assert [(r["method"], r["status_code"]) for r in rows[-2:]] == [("create_message", 200)] * 2
    assert all(r["completion_tokens"] > 0 and r["model"] == DEFAULT for r in rows[-2:])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_gives_a_tool_call_through_the_openai_api(
    stack: Stack, stream: bool, choice: str
) -> None:
    client = stack.client("bob")
    named = {"type": "function", "function": {"name": "get_weather"}}
    tool_choice: Any = "required" if choice == "required" else named
    request: Any = {"model": DEFAULT, "messages": ASK, "tools": [OPENAI_WEATHER],
                    "tool_choice": tool_choice, "temperature": 0, "max_tokens": 300}  # fmt: skip
    if stream:
        name, arguments, finish = "", "", None
        for chunk in client.chat.completions.create(**request, stream=True):
            delta = chunk.choices[0].delta
            for call in delta.tool_calls or ():
                assert call.function is not None
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    else:
        answer = client.chat.completions.create(**request)
        (call,) = answer.choices[0].message.tool_calls or []
        name, arguments = call.function.name, call.function.arguments  # type: ignore[union-attr]
        finish = answer.choices[0].finish_reason
        assert answer.choices[0].message.content is None
    assert finish == "tool_calls"
    assert name == "get_weather"
    assert isinstance(json.loads(arguments)["city"], str)


def test_auto_answers_either_way_and_always_well_formed(stack: Stack) -> None:
    chosen = []
    for question in ("What is the weather in Paris?", "Say hello.", "Is it raining in Oslo?"):
        result = stack.rpc("bob", "create_message", message=question, tools=[WEATHER],
                           temperature=0, max_new_tokens=60, model=DEFAULT)  # fmt: skip
        # Whichever the model chose, it is whole: a call of the declared tool with its arguments
        # as an object, or text with no piece of the call syntax in it.
        if result["type"] == "tool_calls":
            (call,) = result["tool_calls"]
            assert call["name"] == "get_weather"
            assert isinstance(call["arguments"], dict)
        else:
            assert result["type"] == "final_text"
            assert result["content"].strip()
            assert "<tool_call" not in result["content"]
            assert not result["tool_calls"]
        chosen.append((question, result["type"], result["content"][:60]))
    print("\nauto with SmolLM2:", *chosen, sep="\n  ")


def test_stream_sends_the_real_models_text(stack: Stack) -> None:
    request_id = uuid.uuid4().hex
    body = {"message": "Name three colours.", "max_new_tokens": 16, "temperature": 0,
            "model": DEFAULT}  # fmt: skip
    url = f"{stack.url}/stream"
    status, raw = asyncio.run(_post_with_id(url, stack.keys["bob"], body, request_id))
    assert status == 200
    *deltas, last = _events(raw)
    assert deltas
    assert all(set(event) == {"delta"} for event in deltas)
    assert "".join(event["delta"] for event in deltas).strip()
    assert last["done"] is True
    assert last["finish_reason"] in ("stop", "length")
    (row,) = asyncio.run(_rows(stack.dsn, 1, client_request_id=request_id))
    assert (row["path"], row["stream"], row["status_code"]) == ("/stream", True, 200)
    assert row["completion_tokens"] == last["usage"]["completion_tokens"] > 0
    assert row["prompt_tokens"] == last["usage"]["prompt_tokens"]


async def _post_with_id(url: str, key: str, body: Any, request_id: str) -> tuple[int, bytes]:
    headers = {**bearer(key), "X-Request-Id": request_id}
    async with aiohttp.ClientSession() as client, client.post(url, json=body, headers=headers) as r:
        return r.status, await r.read()


def test_two_users_defaults_never_affect_each_other(stack: Stack) -> None:
    hello = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert stack.post("alice", "/setModel", {"modelName": f"{OTHER}.gguf"})[0] == 200
    assert stack.post("bob", "/setModel", {"modelName": DEFAULT})[0] == 200
    for user, model in (("alice", OTHER), ("bob", DEFAULT), ("alice", OTHER)):
        status, raw = stack.post(user, "/v1/chat/completions", hello)
        assert status == 200
        assert json.loads(raw)["model"] == model
        assert stack.rpc(user, "list_models")["your_default"] == model
    assert stack.post("alice", "/setModel", {"modelName": None})[0] == 200
    status, raw = stack.post("alice", "/v1/chat/completions", hello)
    assert (status, json.loads(raw)["model"]) == (200, DEFAULT)
    rows = asyncio.run(_rows(stack.dsn, 1, path="/v1/chat/completions", model=OTHER))
    assert {row["username"] for row in rows} == {"alice"}


TUTOR = "You are a patient tutor who explains things simply. Keep every answer to two sentences."
PHOTOSYNTHESIS = "Plants use sunlight, water and air to make sugar. They give off oxygen doing it."
GREEN = "Leaves hold chlorophyll, which absorbs red and blue light. Green light bounces back."


def test_a_turn_after_restore_cache_finds_its_prompt_cached(stack: Stack) -> None:
    conversation = [
        {"role": "system", "content": TUTOR},
        {"role": "user", "content": "What is photosynthesis?"},
        {"role": "assistant", "content": PHOTOSYNTHESIS},
        {"role": "user", "content": "Why are leaves green?"},
        {"role": "assistant", "content": GREEN},
    ]
    turn = {"tools": [], "max_new_tokens": 8, "model": DEFAULT}
    # Unwarmed, a conversation's next turn finds next to nothing of its prompt cached.
    cold = stack.rpc("bob", "create_message", history=conversation[:3],
                     message="Tell me more.", **turn)  # fmt: skip
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] < 10
    status, raw = stack.post("alice", "/restore_cache",
                             {"messages": conversation, "model": DEFAULT, "tools": []})  # fmt: skip
    assert status == 200
    warmed = json.loads(raw)
    assert warmed["cached_tokens"] > 60
    # Someone else's request in between: the RAM cache keeps alice's warmed state all the same.
    stack.rpc("bob", "create_message", history=[], message="Name a colour.", **turn)
    result = stack.rpc("alice", "create_message", history=conversation,
                       message="And why do they turn red in autumn?", **turn)  # fmt: skip
    cached = result["usage"]["prompt_tokens_details"]["cached_tokens"]
    print(f"\nrestore_cache: {warmed}; the next turn: {result['usage']}")
    # All of the warmed prefix but the few tokens of the generation prompt it ended with.
    assert cached >= warmed["cached_tokens"] - 8
    assert cached < result["usage"]["prompt_tokens"]
    (row,) = asyncio.run(_rows(stack.dsn, 1, path="/restore_cache"))
    assert (row["prompt_tokens"], row["completion_tokens"]) == (warmed["cached_tokens"], 1)


def test_tools_the_backend_cannot_serve_are_a_clear_error_never_a_retry(stack: Stack) -> None:
    """Refused before the model runs, naming the field: not a 5xx a client would retry."""
    many = [{"name": f"f{i}", "parameters": {"type": "object"}} for i in range(129)]
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    for tools, says in (
        (many, "at most 128"),
        ([{"name": "deep", "parameters": deep}], "nested at most 64 levels"),
        ([{"name": "long", "parameters": {"properties": {"t": {"minLength": 5000}}}}], "minLength"),
    ):
        request = {"jsonrpc": "2.0", "method": "create_message", "id": 7,
                   "params": {"message": "Hi", "tools": tools, "model": DEFAULT}}  # fmt: skip
        status, raw = stack.post("bob", "/rpc", request)
        error = json.loads(raw)["error"]
        assert (status, error["code"]) == (200, -32602), error
        assert says in error["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            stack.client("bob").chat.completions.create(
                model=DEFAULT, messages=ASK, max_tokens=5,
                tools=[{"type": "function", "function": tool} for tool in tools],  # type: ignore[misc]
            )  # fmt: skip
        assert says in str(refused.value)
