"""The same recorded backend streams, fed to every API: each renders the same answer and the
ledger row is the same, whichever API the client spoke (the stream is read and counted once)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dialects.reasoning import split_text
from tests.proxy_harness import Harness, bearer, running_proxy

MODEL = "smollm2-test"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1700000000,
             "model": MODEL, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(event).encode() + b"\r\n\r\n"


def _usage(prompt: int, completion: int, cached: int = 0) -> bytes:
    event = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1700000000,
             "model": MODEL, "choices": [],
             "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion,
                       "prompt_tokens_details": {"cached_tokens": cached}}}  # fmt: skip
    return b"data: " + json.dumps(event).encode() + b"\r\n\r\n"


def _call(index: int, name: str | None, arguments: str, call_id: str | None = None) -> bytes:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        piece.update(id=call_id, type="function")
        piece["function"]["name"] = name
    return _chunk({"tool_calls": [piece]})


ROLE = _chunk({"role": "assistant", "content": ""})
PING = b": ping - 2026-12-06 17:00:00.000000+00:00\r\n\r\n"
DONE = b"data: [DONE]\r\n\r\n"

RECORDED = {
    "text": [ROLE, PING, _chunk({"content": "Hello"}), _chunk({"content": " wor"}),
             _chunk({"content": "ld."}), _chunk({}, "stop"), _usage(11, 3, 4), DONE],
    "reasoning": [ROLE, _chunk({"content": "<thi"}), _chunk({"content": "nk>Weigh"}),
                  _chunk({"content": " it.</th"}), _chunk({"content": "ink>\n\nYes"}),
                  _chunk({"content": "."}), _chunk({}, "stop"), _usage(12, 5), DONE],
    "tool calls": [ROLE, _call(0, "get_weather", '{"ci', "call_1"), _call(0, None, 'ty": "Oslo"}'),
                   _call(1, "get_weather", '{"city": "Rome"}', "call_2"),
                   _chunk({}, "tool_calls"), _usage(30, 20), DONE],
    "error mid-stream": [ROLE, _chunk({"content": "Hel"}), _chunk({"content": "lo"}),
                         b'data: {"error": {"message": "llama_decode returned -3"}}\r\n\r\n'],
    "cut before [DONE]": [ROLE, _chunk({"content": "Hel"}), _chunk({"content": "lo"}),
                          _chunk({"content": " there"})],
}  # fmt: skip

TOOL = {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Oslo and Rome?"}]


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        harness.upstream.event_delay = 0.0
        yield harness


def _sse(raw: bytes) -> list[tuple[str | None, Any]]:
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            text = "\n".join(data)
            events.append((name, text if text == "[DONE]" else json.loads(text)))
    return events


async def _post(client: aiohttp.ClientSession, proxy: Harness, path: str, key: str,
                body: Any) -> tuple[int, bytes]:  # fmt: skip
    async with client.post(proxy.url(path), json=body, headers=bearer(key)) as response:
        try:
            return response.status, await response.read()
        except aiohttp.ClientPayloadError:
            return response.status, b"<cut>"


ANTHROPIC_TOOLS = [{"name": TOOL["name"], "description": TOOL["description"],
                    "input_schema": TOOL["parameters"]}]  # fmt: skip
THINKING = {"type": "enabled", "budget_tokens": 1024}
CALLS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai json": ("/v1/chat/completions", {"model": MODEL, "messages": ASK,
                    "tools": [{"type": "function", "function": TOOL}]}),
    "openai stream": ("/v1/chat/completions", {"model": MODEL, "messages": ASK, "stream": True,
                      "tools": [{"type": "function", "function": TOOL}]}),
    "anthropic json": ("/v1/messages", {"model": MODEL, "max_tokens": 2000, "messages": ASK,
                       "thinking": THINKING, "tools": ANTHROPIC_TOOLS}),
    "anthropic stream": ("/v1/messages", {"model": MODEL, "max_tokens": 2000, "messages": ASK,
                         "thinking": THINKING, "tools": ANTHROPIC_TOOLS, "stream": True}),
    "jsonrpc": ("/rpc", {"jsonrpc": "2.0", "method": "create_message", "id": 1,
                "params": {"message": ASK[0]["content"], "tools": [TOOL]}}),
    "/stream": ("/stream", {"message": ASK[0]["content"]}),
    "responses json": ("/v1/responses", {"model": MODEL, "input": ASK[0]["content"],
                       "tools": [{"type": "function", **TOOL}]}),
    "responses stream": ("/v1/responses", {"model": MODEL, "input": ASK[0]["content"],
                         "tools": [{"type": "function", **TOOL}], "stream": True}),
}  # fmt: skip


@dataclass
class Rendered:
    """What one API's answer said, whatever its shape."""

    text: str = ""
    reasoning: str = ""
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # id, name, args
    failed: bool = False  # an error, or a cut, after the answer began (or instead of it)


def _read(api: str, status: int, raw: bytes) -> Rendered:
    said = Rendered(failed=status != 200 or raw.endswith(CUT))
    raw = raw.removesuffix(CUT)
    if api == "openai json" and status == 200:
        message = json.loads(raw)["choices"][0]["message"]
        said.text, said.reasoning = message["content"] or "", message.get("reasoning_content", "")
        said.calls = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                      for c in message.get("tool_calls") or []]  # fmt: skip
    elif api == "openai stream":
        pieces: dict[int, dict[str, str]] = {}
        for _, event in _sse(raw):
            if event == "[DONE]" or not event["choices"]:
                continue
            delta = event["choices"][0]["delta"]
            said.text += delta.get("content") or ""
            said.reasoning += delta.get("reasoning_content") or ""
            for piece in delta.get("tool_calls") or []:
                call = pieces.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.get("id") or ""
                call["name"] += piece["function"].get("name") or ""
                call["arguments"] += piece["function"].get("arguments") or ""
        said.calls = [(c["id"], c["name"], json.loads(c["arguments"])) for c in pieces.values()]
    elif api == "anthropic json" and status == 200:
        for block in json.loads(raw)["content"]:
            if block["type"] == "text":
                said.text += block["text"]
            elif block["type"] == "thinking":
                said.reasoning += block["thinking"]
            else:
                said.calls.append((block["id"], block["name"], block["input"]))
    elif api == "anthropic stream":
        blocks: dict[int, dict[str, Any]] = {}
        for name, event in _sse(raw):
            if name == "content_block_start":
                blocks[event["index"]] = {**event["content_block"], "json": ""}
            elif name == "content_block_delta":
                block, delta = blocks[event["index"]], event["delta"]
                if delta["type"] == "text_delta":
                    said.text += delta["text"]
                elif delta["type"] == "thinking_delta":
                    said.reasoning += delta["thinking"]
                else:
                    block["json"] += delta["partial_json"]
            elif name == "error":
                said.failed = True
        said.calls = [(b["id"], b["name"], json.loads(b["json"]))
                      for b in blocks.values() if b["type"] == "tool_use"]  # fmt: skip
    elif api == "jsonrpc":
        answer = json.loads(raw)
        said.failed = "error" in answer
        if not said.failed:
            result = answer["result"]
            said.reasoning, said.text = split_text(result["content"])
            said.calls = [(c["id"], c["name"], c["arguments"]) for c in result["tool_calls"]]
    elif api in ("responses json", "responses stream"):
        output: list[dict[str, Any]] = []
        if api == "responses json" and status == 200:
            output = json.loads(raw)["output"]
        for _, event in _sse(raw) if api == "responses stream" else ():
            if event["type"] in ("response.completed", "response.incomplete"):
                output = event["response"]["output"]
            said.failed = said.failed or event["type"] == "response.failed"
        for item in output:
            if item["type"] == "message":
                said.text += "".join(part["text"] for part in item["content"])
            elif item["type"] == "reasoning":
                said.reasoning += "".join(part["text"] for part in item["content"])
            else:
                said.calls.append((item["call_id"], item["name"], json.loads(item["arguments"])))
    elif api == "/stream":
        for _, event in _sse(raw):
            said.text += event.get("delta", "")
            said.failed = said.failed or "error" in event
        said.reasoning, said.text = split_text(said.text)
    return said


async def _post(client: aiohttp.ClientSession, proxy: Harness, path: str, key: str,
                body: Any) -> tuple[int, bytes]:  # fmt: skip
    async with client.post(proxy.url(path), json=body, headers=bearer(key)) as response:
        received = b""
        try:
            async for piece in response.content.iter_any():
                received += piece
        except aiohttp.ClientPayloadError:
            received += CUT
        return response.status, received


CUT = b"<the connection was cut>"
WEATHER = [("call_1", "get_weather", {"city": "Oslo"}), ("call_2", "get_weather", {"city": "Rome"})]
EXPECTED = {  # what every API says (JSON-RPC and /stream give the text as generated: split here)
    "text": (Rendered("Hello world."), (11, 3, 4)),
    "reasoning": (Rendered("Yes.", "Weigh it."), (12, 5, 0)),
    "tool calls": (Rendered(calls=WEATHER), (30, 20, 0)),
    "error mid-stream": (Rendered(failed=True), (None, 2, None)),
    "cut before [DONE]": (Rendered(failed=True), (None, 3, None)),
}


@pytest.mark.parametrize("recording", list(RECORDED))
async def test_every_api_renders_a_recorded_stream_alike_and_writes_the_same_row(
    proxy: Harness, recording: str
) -> None:
    key = await proxy.user("alice", rate_limit=1000)
    proxy.upstream.recorded = RECORDED[recording]
    expected, tokens = EXPECTED[recording]
    rendered = {}
    async with aiohttp.ClientSession() as client:
        for api, (path, body) in CALLS.items():
            status, raw = await _post(client, proxy, path, key, body)
            rendered[api] = _read(api, status, raw)
    rows = await proxy.wait_for_records(len(CALLS))
    for api, said in rendered.items():
        if api == "/stream":  # /stream carries no tools: it says why the answer stopped
            assert (said.calls, expected.calls) == ([], expected.calls), api
            said.calls = expected.calls
        if expected.failed:  # what came before the failure is the API's own affair
            said.text = said.reasoning = ""
        assert said == expected, api
    # one row per request, each with the same tokens and the same outcome
    assert [(r.prompt_tokens, r.completion_tokens, r.cached_tokens) for r in rows] == [
        tokens
    ] * len(CALLS)
    assert len({(r.status_code, r.error) for r in rows}) == 1, rows
    if expected.failed:
        assert {r.status_code for r in rows} == {502}
        assert all(r.error for r in rows)
