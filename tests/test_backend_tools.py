"""`backend.tools` and `backend.grammar`: tools described and constrained by grammar, the model's
text read back into OpenAI tool calls, on any chat template.

The first part needs no model: what a request becomes, and how the stream is read back (the
"fake upstream" here is a chunk stream as llama_cpp's chat handler yields it, for each path a
model can take: text, a whole call, a call cut short). The second part runs the real SmolLM2 in
this process (slow): `required` and a named tool always give a well-formed call that matches the
schema, `auto` frees the model after a first token that begins no call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama
from llama_cpp.llama_grammar import SchemaConverter

from backend.grammar import GrammarError, GrammarFilter
from backend.tools import (
    ToolRequestError,
    ToolStream,
    bounded,
    grammar,
    plan,
    read_call,
    render_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


REMOTE = {"$ref": "https://example.com/schema.json"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], "stream": True, **fields}


# -- what a request becomes ---------------------------------------------------------------------


def test_a_request_without_tools_is_left_alone() -> None:
    assert plan(chat(), None) is None
    assert plan(chat(tools=[]), None) is None
    # A format with tool support of its own keeps its requests.
    assert plan(chat(tools=[WEATHER]), "chatml-function-calling") is None


@pytest.mark.parametrize(
    ("choice", "mode"),
    [(None, "auto"), ("auto", "auto"), ("required", "required"), ("none", "none")],
)
def test_the_tools_go_into_the_system_prompt_and_the_choice_into_a_grammar(
    choice: Any, mode: str
) -> None:
    served = plan(chat(tools=[WEATHER, ADD], tool_choice=choice, temperature=0), None)
    assert served is not None
    assert served.mode == mode
    body = served.body
    assert not {"tools", "tool_choice", "grammar"} & set(body)
    assert body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system"
    assert '"name": "get_weather"' in system["content"]
    assert "<tool_call>" in system["content"]
    assert user == {"role": "user", "content": "Hi"}
    rules = served.grammar
    assert rules is not None
    if mode == "none":
        assert "tool_call" not in rules
    else:
        assert '"\\"get_weather\\""' in rules
        assert '"\\"add\\""' in rules
        assert rules.rstrip().splitlines()[-1].endswith("[^<] .*") is (mode == "auto")


def test_a_named_tool_allows_that_tool_only() -> None:
    named = {"type": "function", "function": {"name": "add"}}
    served = plan(chat(tools=[WEATHER, ADD], tool_choice=named), None)
    assert served is not None
    assert served.mode == "required"
    assert served.grammar is not None
    assert "get_weather" not in served.grammar
    assert "get_weather" in served.body["messages"][0]["content"]  # still described


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"$ref": "https://x/y"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_tools_that_cannot_be_served_are_refused_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(ToolRequestError) as refused:
        plan(chat(**fields), None)
    assert refused.value.param == param


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _function(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(
    ("tools", "param", "says"),
    [
        # Many tools: refused at once (OpenAI's own limit), never checked pair by pair.
        ([_function(f"f{i}", {"type": "object"}) for i in range(129)], "tools", "at most 128"),
        # A schema nested past Python's recursion: a clear refusal, not the backend's 500.
        ([_function("deep", _nested(600))], "tools[0].function.parameters", "nested deeper"),
        # More repetitions than llama.cpp's grammar allows cannot be generated at all.
        (
            [_function("long", {"properties": {"t": {"type": "string", "minLength": 1001}}})],
            "tools[0].function.parameters",
            "minLength above 1000",
        ),
    ],
)
def test_tools_past_what_can_be_served_are_refused_before_anything_runs(
    tools: list[dict[str, Any]], param: str, says: str
) -> None:
    with pytest.raises(ToolRequestError) as refused:
        plan(chat(tools=tools, tool_choice="required"), None)
    assert refused.value.param == param
    assert says in str(refused.value)


def test_tools_with_a_response_format_are_fine_when_no_call_is_wanted() -> None:
    served = plan(chat(tools=[WEATHER], tool_choice="none", response_format={"type": "text"}), None)
    assert served is not None
    assert served.grammar is None


def test_calls_and_results_in_the_history_are_written_as_the_model_writes_them() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}  # fmt: skip
    messages = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "1+2 and 3+4?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c2", "content": "7"},
    ]
    rendered = render_messages(messages, [ADD["function"]])
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be exact.\n\nYou can call these tools:")
    written = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert rendered[2] == {"role": "assistant", "content": f"{written}\n{written}"}
    assert rendered[3] == {
        "role": "user",
        "content": "<tool_response>\n3\n</tool_response>\n<tool_response>\n7\n</tool_response>",
    }
    assert read_call(written) == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert read_call(written[:-3]) is None
    assert read_call('<tool_call>\n{"name": "add"}\n</tool_call>') is None


def test_free_strings_and_arrays_are_bounded_so_a_call_always_closes() -> None:
    schema = {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "tags": {"type": "array", "items": {"type": ["string", "null"]}},
            "code": {"type": "string", "pattern": "^[A-Z]+$"},
            "short": {"type": "string", "maxLength": 5},
        },
    }
    capped = bounded(schema)
    assert capped["properties"]["text"]["maxLength"] == 256
    assert capped["properties"]["tags"]["maxItems"] == 32
    assert capped["properties"]["tags"]["items"]["maxLength"] == 256
    assert "maxLength" not in capped["properties"]["code"]
    assert capped["properties"]["short"]["maxLength"] == 5
    assert "maxLength" not in schema["properties"]["text"]  # the client's schema is untouched
    no_parameters = {"type": "function", "function": {"name": "now"}}
    served = plan(chat(tools=[no_parameters], tool_choice="required"), None)
    assert served is not None
    assert served.grammar is not None
    assert 'call-0-arguments ::= "{" space  "}" space' in served.grammar  # the empty object


def test_a_history_with_calls_but_no_tools_is_rendered_too() -> None:
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
    ]  # fmt: skip
    served = plan(chat(messages=messages), None)
    assert served is not None
    assert (served.mode, served.grammar) == ("none", None)
    assert [m["role"] for m in served.body["messages"]] == ["assistant", "user"]


# -- the stream read back -------------------------------------------------------------------------


def _chunks(*pieces: str, finish: str = "stop") -> Iterator[dict[str, Any]]:
    """A chat stream as llama_cpp's template handler yields it."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": "chatcmpl-1", "model": "m", "created": 1, "object": "chat.completion.chunk",
                "choices": [choice]}  # fmt: skip

    yield chunk({"role": "assistant"})
    for piece in pieces:
        yield chunk({"content": piece})
    yield chunk({}, finish)


def _read(mode: str, chunks: Iterator[dict[str, Any]]) -> tuple[str, list[Any], str | None]:
    text, calls, finish = "", [], None
    for chunk in ToolStream(mode).convert(chunks):
        choice = chunk["choices"][0]
        text += choice["delta"].get("content") or ""
        calls += choice["delta"].get("tool_calls") or []
        finish = choice["finish_reason"] or finish
    return text, calls, finish


CALL = [
    "<",
    "tool",
    "_call>\n",
    '{"name": "add", ',
    '"arguments": {"a": 1, "b": 2}}',
    "\n</tool_call>",
]


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_a_whole_call_becomes_one_tool_calls_delta(mode: str) -> None:
    text, calls, finish = _read(mode, _chunks(*CALL))
    assert text == ""
    assert finish == "tool_calls"
    (call,) = calls
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_a_call_cut_short_is_never_sent_half_written(mode: str) -> None:
    text, calls, finish = _read(mode, _chunks(*CALL[:4], finish="length"))
    assert (text, calls, finish) == ("", [], "length")


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_a_text_answer_streams_as_content(mode: str) -> None:
    pieces = ["", "Three", " plus", " <b>four</b>"]
    assert _read(mode, _chunks(*pieces)) == ("Three plus <b>four</b>", [], "stop")


# -- with the real model --------------------------------------------------------------------------

GGUF = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What's the weather like in Paris, in celsius?",
    "Add 2 and 40.",
    "Tell me a joke about cats.",
    "",
]


@pytest.fixture(scope="module")
def llama() -> Iterator[Llama]:
    model = Llama(str(GGUF), n_ctx=1024, n_threads=2, verbose=False)
    yield model
    model.close()


def _ask(llama: Llama, question: str, choice: Any) -> tuple[str, list[Any], str | None]:
    request = chat(messages=[{"role": "user", "content": question}], tools=[WEATHER, ADD],
                   tool_choice=choice, max_tokens=400, temperature=0)  # fmt: skip
    served = plan(request, None)
    assert served is not None
    body = {k: v for k, v in served.body.items() if k not in {"stream", "model"}}
    stream = served.llama_call(usage=True)(llama, stream=True, **body)
    *chunks, usage = list(stream)
    assert usage["usage"]["completion_tokens"] > 0
    return _read("none", iter(chunks))  # already read back: take the chunks as they are


@pytest.mark.slow
def test_large_bounds_are_lowered_to_what_llama_cpps_grammar_takes(llama: Llama) -> None:
    """A maxLength or maxItems past what llama.cpp's grammar takes would be refused by llama.cpp
    only as generation starts, after the answer began: it is lowered to 1000 instead."""
    huge = {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 5000},
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3000}}}  # fmt: skip
    served = plan(chat(tools=[_function("big", huge)], tool_choice="required"), None)
    assert served is not None
    assert served.grammar is not None
    assert "5000" not in served.grammar
    assert "3000" not in served.grammar
    GrammarFilter(llama, served.grammar)  # llama.cpp takes it
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit({"type": "string", "maxLength": 5000}, "")
    with pytest.raises(GrammarError):  # and would have refused the bound as asked
        GrammarFilter(llama, converter.format_grammar())


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS)
def test_required_always_gives_a_call_that_matches_a_schema(llama: Llama, question: str) -> None:
    text, calls, finish = _ask(llama, question, "required")
    assert (text, finish) == ("", "tool_calls")
    (call,) = calls
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert isinstance(arguments["city"], str)
        assert arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert call["function"]["name"] == "add"
        assert isinstance(arguments["a"], int)
        assert isinstance(arguments["b"], int)


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_a_named_tool_is_the_one_called(llama: Llama, question: str) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    _, calls, finish = _ask(llama, question, named)
    assert finish == "tool_calls"
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS[:3])
def test_auto_gives_either_a_whole_call_or_text(llama: Llama, question: str) -> None:
    text, calls, finish = _ask(llama, question, "auto")
    if calls:
        assert (text, finish) == ("", "tool_calls")
        json.loads(calls[0]["function"]["arguments"])
    else:
        assert text
        assert not text.startswith("<")
        assert finish in ("stop", "length")


@pytest.mark.slow
def test_the_filter_looks_at_the_whole_vocabulary_rarely_and_frees_text(llama: Llama) -> None:
    served = plan(chat(tools=[WEATHER], tool_choice="required"), None)
    assert served is not None
    assert served.grammar is not None
    prompt = "<|im_start|>user\nWeather in Rome?<|im_end|>\n<|im_start|>assistant\n"
    strict = GrammarFilter(llama, served.grammar)
    out: Any = llama.create_completion(prompt, max_tokens=60, temperature=0,
                                       logits_processor=[strict])  # fmt: skip
    assert read_call(out["choices"][0]["text"]) is not None
    assert strict.full_looks <= 5  # most tokens are decided among the likeliest
    lazy = GrammarFilter(llama, grammar([WEATHER["function"]], "auto"), lazy=True)
    text: Any = llama.create_completion("Once upon a time", max_tokens=8, temperature=0,
                                        logits_processor=[lazy])  # fmt: skip
    assert not text["choices"][0]["text"].startswith("<")
    assert lazy._free  # a text answer: the rest ran unconstrained


# What Claude Code sends for a parameter of pydantic's `Any`: a schema without a type.
UNTYPED = _function(
    "run",
    {
        "type": "object",
        "properties": {
            "command": {"type": "string", "maxLength": 40},
            "args": {"title": "Args"},
            "extra": {},
        },
        "required": ["command", "args"],
    },
)


def test_a_parameter_without_a_type_is_served_as_any_json_value() -> None:
    """`{"title": "Args"}` was a 400 ("a JSON schema this server cannot constrain generation
    to"), and `{}` was read as "an object": both mean any JSON value."""
    served = plan(chat(tools=[UNTYPED], tool_choice="required"), None)
    assert served is not None
    assert served.grammar is not None
    for name in ("args", "extra"):  # each may be any of JSON's values, a string among them
        rule = next(line for line in served.grammar.splitlines() if f"-{name} ::=" in line)
        assert "string" in rule
        assert "null" in rule
    # The prompt shows the client's schema as sent; only generation reads it as any value.
    assert '"title": "Args"' in served.body["messages"][0]["content"]
    whole = plan(chat(tools=[_function("f", {"title": "Args"})], tool_choice="required"), None)
    assert whole is not None
    assert whole.grammar is not None  # the arguments themselves are still an object


@pytest.mark.slow
def test_a_call_with_an_untyped_parameter_is_generated_whole(llama: Llama) -> None:
    question = [{"role": "user", "content": "List the files with ls -la"}]
    request = chat(
        messages=question, tools=[UNTYPED], tool_choice="required", max_tokens=300, temperature=0
    )
    served = plan(request, None)
    assert served is not None
    assert served.grammar is not None
    GrammarFilter(llama, served.grammar)  # llama.cpp takes the grammar
    body = {k: v for k, v in served.body.items() if k not in {"stream", "model"}}
    *chunks, _ = list(served.llama_call(usage=True)(llama, stream=True, **body))
    _, calls, finish = _read("none", iter(chunks))
    assert finish == "tool_calls"
    (call,) = calls
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["command"], str)
    assert "args" in arguments
