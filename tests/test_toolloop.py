"""JSON-RPC create_message as a multi-turn tool loop against a backend that calls tools: the
client runs the calls and sends their results back, and neither loop guard lets it go on forever.
Also the rules of `proxy.dialects.toolloop` on their own (iteration counting, repeated calls)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.dialects.conversation import CreateMessage, Message, ToolCall
from proxy.dialects.toolloop import begin, read, repeated
from proxy.errors import InvalidRequest
from proxy.settings import SettingsError
from tests.fake_upstream import FakeUpstream
from tests.proxy_harness import BACKEND_KEY, Harness, proxy_settings, running_proxy
from tests.test_jsonrpc import call, chats, rpc

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def calls(*arguments: Any, name: str = "get_weather") -> dict[str, Any]:
    """A scripted model answer asking for one call per `arguments`."""
    return {"tool_calls": [{"name": name, "arguments": a} for a in arguments]}


@asynccontextmanager
async def scripted(
    db_dsn: str, tmp_path: Path, script: list[dict[str, Any]], **settings: str
) -> AsyncIterator[tuple[Harness, str]]:
    """The proxy in front of a model answering with `script`, and a user's key."""
    upstream = FakeUpstream(expected_key=BACKEND_KEY, script=script)
    async with running_proxy(db_dsn, tmp_path, upstream, True, **settings) as proxy:
        yield proxy, await proxy.user("alice")


async def create_message(proxy: Harness, key: str, **params: Any) -> dict[str, Any]:
    status, body, _ = await rpc(proxy, key, call(params=params, id=1))
    assert status == 200
    assert "result" in body, body
    result: dict[str, Any] = body["result"]
    return result


async def test_tool_calls_then_results_then_a_final_text(db_dsn: str, tmp_path: Path) -> None:
    script = [calls({"city": "Paris"}), {"content": "It is 21 degrees and sunny in Paris."}]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        first = await create_message(
            proxy, key, message="Weather in Paris?", tools=[WEATHER], temperature=0
        )
        assert first["type"] == "tool_calls"
        assert first["iteration_count"] == 1
        assert first["loop_guard"] is None
        (asked,) = first["tool_calls"]
        assert asked["name"] == "get_weather"
        assert asked["arguments"] == {"city": "Paris"}  # an object, assembled from two pieces
        assert [m["role"] for m in first["history"]] == ["user", "assistant"]
        assert first["history"][1]["tool_calls"] == [asked]
        # The client runs the tool and sends its result back with the history it got.
        second = await create_message(
            proxy,
            key,
            history=first["history"],
            tool_results=[{"tool_call_id": asked["id"], "content": {"celsius": 21}}],
            tools=[WEATHER],
        )
        sent = chats(proxy)
        records = await proxy.wait_for_records(2)
    assert second["type"] == "final_text"
    assert second["content"] == "It is 21 degrees and sunny in Paris."
    assert second["tool_calls"] == []
    assert second["iteration_count"] == 2
    assert [m["role"] for m in second["history"]] == ["user", "assistant", "tool", "assistant"]
    assert second["history"][2] == {
        "role": "tool",
        "tool_call_id": asked["id"],
        "name": "get_weather",
        "content": '{"celsius": 21}',
    }
    # What the backend was sent: OpenAI's forms, tool_choice auto, always a stream with usage.
    assert sent[0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert sent[0]["tool_choice"] == "auto"
    assert sent[0]["temperature"] == 0
    assert sent[0]["stream"] is True
    assert sent[1]["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": asked["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert sent[1]["messages"][2]["role"] == "tool"
    assert [(r.method, r.status_code, r.completion_tokens) for r in records] == [
        ("create_message", 200, 2),
        ("create_message", 200, 2),
    ]


async def test_a_call_repeated_with_the_same_arguments_gets_a_final_text_instead(
    db_dsn: str, tmp_path: Path
) -> None:
    script = [calls({"city": "Paris"}), calls({"city": "Paris"}), {"content": "Sunny."}]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        first = await create_message(proxy, key, message="Weather?", tools=[WEATHER])
        (asked,) = first["tool_calls"]
        results = [{"tool_call_id": asked["id"], "content": "sunny"}]
        second = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
        sent = chats(proxy)
        records = await proxy.wait_for_records(2)
    assert second["type"] == "final_text"
    assert second["content"] == "Sunny."
    assert second["loop_guard"] == "repeated_tool_call"
    assert second["iteration_count"] == 2
    # The repeated call was dropped: the history ends with the final answer.
    assert [m["role"] for m in second["history"]] == ["user", "assistant", "tool", "assistant"]
    assert "tool_calls" not in second["history"][-1]
    # Asked twice within the one call: first with tools, then for a final answer without.
    assert [body.get("tool_choice") for body in sent] == ["auto", "auto", "none"]
    # One row for the call, with the tokens of both answers.
    assert records[1].completion_tokens == 4
    assert records[1].prompt_tokens == 10
    assert second["usage"]["completion_tokens"] == 4


async def test_the_same_tool_with_other_arguments_is_no_repeat(db_dsn: str, tmp_path: Path) -> None:
    script = [calls({"city": "Paris"}), calls({"city": "Rome"})]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        first = await create_message(proxy, key, message="Paris and Rome?", tools=[WEATHER])
        results = [{"tool_call_id": first["tool_calls"][0]["id"], "content": "sunny"}]
        second = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
    assert second["type"] == "tool_calls"
    assert second["tool_calls"][0]["arguments"] == {"city": "Rome"}
    assert second["iteration_count"] == 2


async def test_max_iterations_asks_for_a_final_answer_without_tools(
    db_dsn: str, tmp_path: Path
) -> None:
    script = [calls({"city": "A"}), calls({"city": "B"}), {"content": "Done."}]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        result = await create_message(proxy, key, message="Go", tools=[WEATHER], max_iterations=2)
        assert result["iteration_count"] == 1
        results = [{"tool_call_id": result["tool_calls"][0]["id"], "content": "x"}]
        result = await create_message(
            proxy, key, history=result["history"], tool_results=results,
            tools=[WEATHER], max_iterations=2,
        )  # fmt: skip
        sent = chats(proxy)
    assert result["type"] == "final_text"
    assert result["iteration_count"] == 2
    assert result["loop_guard"] == "max_iterations"
    assert [body.get("tool_choice") for body in sent] == ["auto", "none"]
    assert result["content"] == "Hello world"  # the model's text answer (the script waits)


async def test_max_iterations_is_five_when_the_client_sends_none(
    db_dsn: str, tmp_path: Path
) -> None:
    # More distinct calls than five turns take: only the default can end this loop.
    script = [calls({"city": f"city {i}"}) for i in range(7)]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        result = await create_message(proxy, key, message="Go", tools=[WEATHER])
        turns = [result]
        while result["type"] == "tool_calls" and len(turns) < 10:
            results = [{"tool_call_id": result["tool_calls"][0]["id"], "content": "x"}]
            result = await create_message(
                proxy, key, history=result["history"], tool_results=results, tools=[WEATHER]
            )
            turns.append(result)
        sent = chats(proxy)
        left = len(proxy.upstream.script)
    assert [t["iteration_count"] for t in turns] == [1, 2, 3, 4, 5]
    assert [t["type"] for t in turns] == ["tool_calls"] * 4 + ["final_text"]
    assert [t["loop_guard"] for t in turns] == [None] * 4 + ["max_iterations"]
    assert [body["tool_choice"] for body in sent] == ["auto"] * 4 + ["none"]
    assert [t["tool_calls"][0]["arguments"]["city"] for t in turns[:4]] == [
        f"city {i}" for i in range(4)
    ]
    assert left == 3  # the fifth turn took no call from the script: it was asked for text
    assert result["content"] == "Hello world"
    assert result["tool_calls"] == []


async def test_the_forced_final_request_keeps_the_tools_in_the_prompt_with_choice_none(
    db_dsn: str, tmp_path: Path
) -> None:
    # What the backend gets when the loop asks for a final answer: the same tools as every turn
    # (so the prompt, and the prompt cache, stay the same; llama-gate's backend then allows text
    # only, see backend.tools) and tool_choice "none", with the whole conversation.
    script = [calls({"city": "A"}), {"content": "Done."}]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        first = await create_message(proxy, key, message="Go", tools=[WEATHER], max_iterations=2)
        results = [{"tool_call_id": first["tool_calls"][0]["id"], "content": "x"}]
        await create_message(
            proxy, key, history=first["history"], tool_results=results,
            tools=[WEATHER], max_iterations=2,
        )  # fmt: skip
        sent = chats(proxy)
    assert len(sent) == 2
    final = sent[1]
    assert final["tool_choice"] == "none"
    assert final["tools"] == sent[0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert [m["role"] for m in final["messages"]] == ["user", "assistant", "tool"]
    assert final["stream"] is True


async def test_a_backend_calling_tools_when_told_none_still_gets_the_client_a_final_text(
    db_dsn: str, tmp_path: Path
) -> None:
    # A backend that ignores tool_choice "none" (this fake answers every chat request with text
    # and a call): a forced final answer never hands the client a call to run.
    upstream = FakeUpstream(
        expected_key=BACKEND_KEY, tool_calls=[{"name": "get_weather", "arguments": {"city": "X"}}]
    )
    async with running_proxy(db_dsn, tmp_path, upstream) as proxy:
        key = await proxy.user("alice")
        capped = await create_message(proxy, key, message="Go", tools=[WEATHER], max_iterations=1)
        first = await create_message(proxy, key, message="Go", tools=[WEATHER])
        results = [{"tool_call_id": first["tool_calls"][0]["id"], "content": "x"}]
        repeated_call = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
        sent = chats(proxy)
    assert first["type"] == "tool_calls"  # the fake does call
    assert [body["tool_choice"] for body in sent] == ["none", "auto", "auto", "none"]
    for result, guard in ((capped, "max_iterations"), (repeated_call, "repeated_tool_call")):
        assert result["type"] == "final_text"
        assert result["loop_guard"] == guard
        assert result["tool_calls"] == []
        assert result["content"] == "Hello world"
        assert result["history"][-1] == {"role": "assistant", "content": "Hello world"}


async def test_max_iterations_is_capped_by_the_setting(db_dsn: str, tmp_path: Path) -> None:
    script = [calls({"city": str(i)}) for i in range(5)]
    async with scripted(db_dsn, tmp_path, script, LLAMA_PROXY_MAX_TOOL_ITERATIONS="3") as (
        proxy,
        key,
    ):
        result = await create_message(proxy, key, message="Go", tools=[WEATHER], max_iterations=50)
        while result["type"] == "tool_calls":
            results = [{"tool_call_id": result["tool_calls"][0]["id"], "content": "x"}]
            result = await create_message(
                proxy, key, history=result["history"], tool_results=results,
                tools=[WEATHER], max_iterations=50,
            )  # fmt: skip
    assert result["iteration_count"] == 3
    assert result["loop_guard"] == "max_iterations"
    # The backend gave every call the same id; the history's are all different.
    ids = [c["id"] for m in result["history"] for c in m.get("tool_calls", [])]
    assert len(ids) == len(set(ids)) == 2


async def test_a_new_user_message_starts_the_count_again(db_dsn: str, tmp_path: Path) -> None:
    script = [calls({"city": "Paris"}), {"content": "Sunny."}, calls({"city": "Paris"})]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        first = await create_message(proxy, key, message="Weather?", tools=[WEATHER])
        results = [{"tool_call_id": first["tool_calls"][0]["id"], "content": "sunny"}]
        second = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
        # The same question again: the same call is no repeat after a new user message.
        third = await create_message(
            proxy, key, history=second["history"], message="And now?", tools=[WEATHER]
        )
    assert second["iteration_count"] == 2
    assert third["iteration_count"] == 1
    assert third["type"] == "tool_calls"


async def test_a_call_whose_arguments_are_no_object_gets_a_final_text(
    db_dsn: str, tmp_path: Path
) -> None:
    script: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "get_weather", "arguments": "Paris"}]},
        {"content": "?"},
    ]
    async with scripted(db_dsn, tmp_path, script) as (proxy, key):
        result = await create_message(proxy, key, message="Weather?", tools=[WEATHER])
    assert result["type"] == "final_text"
    assert result["loop_guard"] == "unusable_tool_call"


async def test_auto_lets_the_model_answer_in_text(db_dsn: str, tmp_path: Path) -> None:
    async with scripted(db_dsn, tmp_path, [{"content": "No tool needed."}]) as (proxy, key):
        result = await create_message(proxy, key, message="Hi", tools=[WEATHER])
    assert result["type"] == "final_text"
    assert result["content"] == "No tool needed."
    assert result["loop_guard"] is None


async def test_tool_choice_is_passed_on_and_a_named_tool_must_exist(
    db_dsn: str, tmp_path: Path
) -> None:
    async with scripted(db_dsn, tmp_path, [calls({"city": "Oslo"})]) as (proxy, key):
        result = await create_message(
            proxy, key, message="Oslo?", tools=[WEATHER], tool_choice="get_weather"
        )
        params = {"message": "x", "tools": [WEATHER], "tool_choice": "add"}
        status, body, _ = await rpc(proxy, key, call(params=params, id=2))
        sent = chats(proxy)
    assert status == 200
    assert result["type"] == "tool_calls"
    assert sent[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["error"]["code"] == -32602
    assert body["error"]["data"]["param"] == "tool_choice"
    assert "get_weather" in body["error"]["message"]


async def test_the_declared_tools_are_listed_and_used_when_a_call_names_none(
    db_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "tools.json").write_text(json.dumps({"tools": [WEATHER]}))
    script = [calls({"city": "Lima"})]
    async with scripted(db_dsn, tmp_path, script, LLAMA_PROXY_TOOLS_FILE="tools.json") as (
        proxy,
        key,
    ):
        status, body, _ = await rpc(proxy, key, call("tool_list", id=1))
        result = await create_message(proxy, key, message="Lima?")
        await create_message(proxy, key, message="No tools", tools=[])
        sent = chats(proxy)
    assert status == 200
    assert body["result"] == {"tools": [WEATHER]}
    assert result["type"] == "tool_calls"
    assert sent[0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert "tools" not in sent[1]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[1", "is not JSON"),
        ('{"tools": 3}', "expected a JSON list"),
        ('[{"name": "a b"}]', "tool 0: name"),
        ('[{"name": "a"}, {"name": "a"}]', "same name"),
        (None, "cannot read"),
    ],
)
def test_a_bad_tools_file_stops_startup_naming_it(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    if content is not None:
        (tmp_path / "tools.json").write_text(content)
    settings = proxy_settings("postgresql://x@127.0.0.1/x", 9, tmp_path,
                              LLAMA_PROXY_TOOLS_FILE="tools.json")  # fmt: skip
    with pytest.raises(SettingsError, match=problem) as raised:
        create_app(settings)
    assert "LLAMA_PROXY_TOOLS_FILE='tools.json'" in str(raised.value)


# -- the rules on their own --------------------------------------------------------------------


def _params(**fields: Any) -> CreateMessage:
    return CreateMessage.model_validate(fields)


def _begin(params: CreateMessage) -> Any:
    return begin(params, declared=(), max_tokens=100, iteration_cap=10, default_model=None)


def test_iterations_count_model_turns_since_the_last_user_message() -> None:
    one = {"id": "1", "name": "f", "arguments": {}}
    two = {"id": "2", "name": "f", "arguments": {"x": 1}}
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "tool_calls": [one]},
        {"role": "tool", "tool_call_id": "1", "content": "r"},
        {"role": "assistant", "tool_calls": [two]},
    ]
    turn = _begin(_params(history=history, tool_results=[{"id": "2", "content": "r2"}]))
    assert turn.iteration == 3
    assert turn.conversation[-1] == Message(role="tool", tool_call_id="2", name="f", content="r2")
    assert _begin(_params(history=history, message="new")).iteration == 1
    with pytest.raises(InvalidRequest, match="already has a result"):
        _begin(_params(history=history, tool_results=[{"id": "1", "content": "again"}]))


def test_a_repeat_is_the_same_name_and_arguments_with_a_result_since_the_last_user() -> None:
    conversation = [
        Message(role="user", content="q"),
        Message(
            role="assistant", tool_calls=[ToolCall(id="1", name="f", arguments={"a": 1, "b": 2})]
        ),
        Message(role="tool", tool_call_id="1", content="r"),
        Message(role="assistant", tool_calls=[ToolCall(id="2", name="f", arguments={"a": 3})]),
    ]
    same = ToolCall(id="9", name="f", arguments={"b": 2, "a": 1})  # key order does not matter
    assert repeated(conversation, [same])
    assert not repeated(conversation, [ToolCall(id="9", name="g", arguments={"a": 1, "b": 2})])
    # Call 2 has no result yet: asking for it again is no repeat.
    assert not repeated(conversation, [ToolCall(id="9", name="f", arguments={"a": 3})])
    assert not repeated([*conversation, Message(role="user", content="again")], [same])


def test_reading_an_answer_keeps_calls_as_objects() -> None:
    document = {
        "model": "m",
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "f", "arguments": '{"x": [1]}'}},
                        {"function": {"name": "g", "arguments": ""}},
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 3},
    }
    reading = read(document)
    assert reading.calls[0] == ToolCall(id="c1", name="f", arguments={"x": [1]})
    assert reading.calls[1].arguments == {}
    assert reading.calls[1].id.startswith("call_")
    assert (reading.text, reading.finish_reason, reading.unusable) == ("", "tool_calls", False)
    assert read({"choices": []}).text == ""


async def test_the_callers_cap_bounds_the_whole_call_every_model_turn_included(
    db_dsn: str, tmp_path: Path
) -> None:
    """A repeated call makes one create_message ask the model twice: both answers together
    stay within the caller's cap on one answer (30 here), not 30 each."""
    script = [calls({"city": "Paris"}), calls({"city": "Paris"}), {"content": "Sunny."}]
    async with scripted(db_dsn, tmp_path, script, MAX_TOKENS_HARD_CAP="30") as (proxy, key):
        first = await create_message(proxy, key, message="Weather?", tools=[WEATHER])
        (asked,) = first["tool_calls"]
        results = [{"tool_call_id": asked["id"], "content": "sunny"}]
        proxy.upstream.usage = {"prompt_tokens": 5, "completion_tokens": 21}  # each answer
        second = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
        # Had the first answer used all 30, there would be no second model turn at all.
        proxy.upstream.script = [calls({"city": "Paris"})]
        proxy.upstream.usage = {"prompt_tokens": 5, "completion_tokens": 30}
        third = await create_message(
            proxy, key, history=first["history"], tool_results=results, tools=[WEATHER]
        )
        sent = chats(proxy)
    assert [body["max_tokens"] for body in sent] == [30, 30, 9, 30]
    assert second["loop_guard"] == "repeated_tool_call"
    assert (third["loop_guard"], third["finish_reason"]) == ("repeated_tool_call", "length")
    assert third["content"] == ""
