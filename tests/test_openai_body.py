"""What the proxy believes is what the backend does: OpenAI bodies checked against OpenAI's types,
refused with a 400 naming the field, and forwarded as the proxy's own normalized copy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.proxy_harness import Harness, bearer, running_proxy

CHAT: dict[str, Any] = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


async def _post(
    proxy: Harness,
    key: str,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    headers = {**bearer(key), **(headers or {})}
    async with (
        aiohttp.ClientSession() as client,
        client.post(proxy.url(path), headers=headers, **kwargs) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"stream": 1}, "stream"),  # llama_cpp.server would stream it, unmetered
        ({"stream": "true"}, "stream"),
        ({"top_p": 5}, "top_p"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_logprobs": 99999, "logprobs": True}, "top_logprobs"),  # a 61 MB answer once
        ({"n": 2}, "n"),  # llama_cpp.server would answer one choice, silently
        ({"logit_bias": {"42": 1e9}}, "logit_bias.42"),
        ({"stop": ["a"] * 50}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"max_tokens": "many"}, "max_tokens"),
    ],
)
async def test_a_field_of_the_wrong_type_or_range_is_a_400_naming_it(
    proxy: Harness, change: dict[str, Any], param: str
) -> None:
    key = await proxy.user("alice")
    status, body = await _post(proxy, key, json={**CHAT, **change})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param, body
    assert param.split(".")[0] in body["error"]["message"]
    assert proxy.upstream.seen == []


async def test_top_logprobs_is_bounded_at_openais_20(proxy: Harness) -> None:
    key = await proxy.user("alice")
    status, body = await _post(proxy, key, json={**CHAT, "logprobs": True, "top_logprobs": 20})
    assert status == 200, body
    sent = json.loads(proxy.upstream.seen[-1].body)
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 20)
    status, body = await _post(proxy, key, json={**CHAT, "logprobs": True, "top_logprobs": 21})
    assert status == 400, body
    assert body["error"]["param"] == "top_logprobs"
    assert "top_logprobs" in body["error"]["message"]
    assert "20" in body["error"]["message"]  # says what it may be
    assert len(proxy.upstream.seen) == 1


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"messages": [], "top_p": NaN}', "NaN is not a JSON number"),
        (b'{"messages": [], "temperature": Infinity}', "Infinity is not a JSON number"),
        (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "a number in it is too long"),
        # A float past a double's range would come back (in an echoed history) as Infinity.
        (b'{"messages": [], "top_p": 1e400}', "1e400 is not a JSON number this server can hold"),
    ],
)
async def test_numbers_json_does_not_have_are_a_400_not_a_500(
    proxy: Harness, raw: bytes, detail: str
) -> None:
    key = await proxy.user("alice")
    headers = {"Content-Type": "application/json"}
    status, body = await _post(proxy, key, data=raw, headers=headers)
    assert status == 400, body
    assert detail in body["error"]["message"]
    assert proxy.upstream.seen == []


async def test_an_integer_of_any_length_reaches_the_backend_exactly(proxy: Harness) -> None:
    """A tool's schema may bound a number past 64 bits: it is forwarded as it was sent, not
    turned into a float nor refused by the writer (once a 500)."""
    key = await proxy.user("alice")
    huge = 123456789012345678901234567890
    tool = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {"type": "object", "properties": {"n": {"maximum": huge}}},
        },
    }
    for with_bom in (False, True):  # read by the fast reader, and by the careful one
        raw = json.dumps({**CHAT, "tools": [tool]}).encode()
        headers = {"Content-Type": "application/json"}
        status, body = await _post(
            proxy, key, data=b"\xef\xbb\xbf" + raw if with_bom else raw, headers=headers
        )
        assert status == 200, body
        sent = json.loads(proxy.upstream.seen[-1].body)
        assert sent["tools"][0]["function"]["parameters"]["properties"]["n"]["maximum"] == huge
        assert str(huge).encode() in proxy.upstream.seen[-1].body


async def test_the_backend_gets_only_checked_fields_normalized(proxy: Harness) -> None:
    key = await proxy.user("alice")
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        "temperature": 0,
        "store": True,  # OpenAI-only: dropped
        "parallel_tool_calls": False,
        "metadata": {"x": "y"},
    }
    status, _ = await _post(proxy, key, json=body)
    assert status == 200
    sent = json.loads(proxy.upstream.seen[-1].body)
    assert sent == {
        "model": "smollm2-test",
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        # llama_cpp's spelling of schema-constrained JSON
        "response_format": {"type": "json_object", "schema": schema},
        "temperature": 0,
        "max_tokens": 1024,
        "stream": True,
        "stream_options": {"include_usage": True, "llama_gate_progress": True},
    }


async def test_completions_and_embeddings_are_checked_too(proxy: Harness) -> None:
    key = await proxy.user("alice")
    for path, body, param in (
        ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": {"text": "Hi"}}, "prompt"),
        ("/v1/embeddings", {"input": None}, "input"),
        ("/v1/embeddings", {"input": [1.5]}, "input"),
    ):
        status, answer = await _post(proxy, key, path, json=body)
        assert (status, answer["error"]["param"]) == (400, param), (path, body, answer)
    status, _ = await _post(proxy, key, "/v1/completions", json={"prompt": "Hi", "echo": False})
    assert status == 200
    assert json.loads(proxy.upstream.seen[-1].body)["prompt"] == "Hi"
    assert [seen.path for seen in proxy.upstream.seen] == ["/v1/completions"]


async def test_answers_past_the_size_bound_are_cut_and_recorded(
    db_dsn: str, tmp_path: Path
) -> None:
    async with running_proxy(db_dsn, tmp_path, LLAMA_PROXY_MAX_ANSWER_BYTES="200000") as proxy:
        key = await proxy.user("alice")
        proxy.upstream.pieces = ["x" * 50_000] * 10
        proxy.upstream.event_delay = 0.0
        status, body = await _post(proxy, key, json=CHAT)
        assert status == 502
        assert body["error"]["code"] == "answer_too_large"
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                proxy.url("/v1/chat/completions"),
                json={**CHAT, "stream": True},
                headers=bearer(key),
            ) as r,
        ):
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        rows = await proxy.wait_for_records(2)
    assert [row.status_code for row in rows] == [502, 502]
    assert all("answer_too_large" in str(row.error) for row in rows)
    assert rows[1].response_bytes <= 200_000


# -- parsing: the fast reader, and the careful one for whatever it refuses ------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "unsure"),
    [
        (b'{"a": [1, 2.5, "x\\u00e9", null, true]}', {"a": [1, 2.5, "xé", None, True]}, False),
        (b'{"a": 1, "a": 2}', {"a": 2}, False),  # the last of a repeated key, as json.loads does
        (b'{"a": "\\ud83d\\ude00"}', {"a": "😀"}, False),  # a surrogate pair is one character
        (b'{"a": "\\ud800"}', {"a": "\ud800"}, True),  # lone: read, then named by the checks
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}, False),  # a BOM: read past, as json.loads does
        # integers of any length, exactly, on both ways of reading (a BOM takes the second)
        (b'{"a": 123456789012345678901234567890}', {"a": 123456789012345678901234567890}, False),
        (b'\xef\xbb\xbf{"a": -123456789012345678901}', {"a": -123456789012345678901}, False),
    ],
)
def test_parse_json_reads_fast_and_leaves_lone_surrogates_to_be_named(
    raw: bytes, expected: Any, unsure: bool
) -> None:
    from proxy.dialects.openai_body import parse_json

    assert parse_json(raw) == (expected, unsure)


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"", "the body is empty"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": 1e400}', "1e400 is not a JSON number this server can hold"),
        (b'{"a": ', "Expecting value"),
        (b'{"a": "\xff"}', "UTF-8"),
    ],
)
def test_parse_json_says_what_is_wrong_as_the_standard_library_would(raw: bytes, said: str) -> None:
    from proxy.dialects.openai_body import parse_json
    from proxy.errors import InvalidJson

    with pytest.raises(InvalidJson) as refused:
        parse_json(raw)
    assert said in refused.value.message
