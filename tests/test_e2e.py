"""End to end: the openai package -> llama-gate proxy -> the real llama_cpp.server with SmolLM2,
users made with the real admin script, audit rows read back from Postgres."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
from pydantic import BaseModel

from tests.agent_helpers import CLAUDE, CODEX, claude, codex, needs
from tests.backend_harness import DEFAULT, REPO, Backend, running_backend
from tests.cli_helpers import KEY_RE
from tests.proxy_harness import proxy_process

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@dataclass(frozen=True)
class Stack:
    url: str
    dsn: str
    backend: Backend
    keys: dict[str, str]
    environ: dict[str, str] = field(default_factory=dict)  # the proxy's (for a second one)
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)  # closed with the stack

    def client(self, user: str) -> openai.OpenAI:
        if user not in self.clients:
            self.clients[user] = openai.OpenAI(
                base_url=f"{self.url}/v1", api_key=self.keys[user], max_retries=0
            )
        return self.clients[user]

    def async_client(self, user: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[user], max_retries=0)


def _create_user(dsn: str, username: str) -> str:
    result = subprocess.run(
        [str(REPO / "bin" / "user_management_cli.sh"), "create-user", "--username", username],
        env={"PATH": "/usr/bin:/bin", "POSTGRES_AUTH_DSN": dsn},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = KEY_RE.search(result.stdout)
    assert match, result.stdout
    return match.group(0)


@pytest.fixture(scope="module")
def stack(module_db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {name: _create_user(module_db_dsn, name) for name in ("alice", "bob")}
    with running_backend(tmp_path_factory.mktemp("e2e-backend")) as backend:
        environ = {
            "POSTGRES_AUTH_DSN": module_db_dsn,
            "LLAMA_GATE_HOME": str(tmp_path_factory.mktemp("e2e-proxy")),
            "LLAMA_SERVER_HOST": "127.0.0.1",
            "LLAMA_SERVER_PORT": str(backend.port),
            "LLAMA_SERVER_API_KEY": backend.key,
            "LLAMA_PROXY_METRICS_PORT": "0",
            "LLAMA_PROXY_DASHBOARD_PORT": "0",
        }
        with proxy_process(environ) as url:
            stack = Stack(url, module_db_dsn, backend, keys, environ)
            yield stack
            for client in stack.clients.values():
                client.close()


async def _audit_row(dsn: str, request_id: str) -> asyncpg.Record:
    deadline = time.monotonic() + 10
    con = await asyncpg.connect(dsn)
    try:
        while True:
            row = await con.fetchrow(
                "SELECT * FROM llama_requests WHERE client_request_id = $1", request_id
            )
            if row is not None or time.monotonic() > deadline:
                assert row is not None, f"no audit row for {request_id}"
                return row
            await asyncio.sleep(0.1)
    finally:
        await con.close()


def test_chat_stream_models_and_embeddings_through_the_proxy(stack: Stack) -> None:
    client = stack.client("alice")
    assert DEFAULT in [model.id for model in client.models.list()]
    chat = client.chat.completions.create(model=DEFAULT, messages=MESSAGES, max_tokens=16)
    assert chat.choices[0].message.content
    assert chat.usage is not None
    assert chat.usage.completion_tokens > 0
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(
        model=DEFAULT, messages=MESSAGES, max_tokens=16, stream=True
    ):
        assert chunk.choices, "a usage chunk reached a client that did not ask for one"
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces)
    assert finish in {"stop", "length"}
    embedding = client.embeddings.create(model=DEFAULT, input="hello")
    assert len(embedding.data[0].embedding) > 100
    with (
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="lgk_bad", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


def test_streamed_audit_row_counts_the_same_tokens_as_unstreamed(stack: Stack) -> None:
    client = stack.client("alice")
    ids = {"plain": uuid.uuid4().hex, "stream": uuid.uuid4().hex}
    request = {
        "model": DEFAULT,
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
        "seed": 7,
    }
    # Both runs below reuse the prompt already in the model's context, as the first does not:
    # the same greedy tokens need the same arithmetic.
    client.chat.completions.create(**request)
    plain = client.chat.completions.create(**request, extra_headers={"X-Request-Id": ids["plain"]})
    streamed_text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            **request, stream=True, extra_headers={"X-Request-Id": ids["stream"]}
        )
    )
    assert streamed_text == plain.choices[0].message.content
    rows = {name: asyncio.run(_audit_row(stack.dsn, rid)) for name, rid in ids.items()}
    assert plain.usage is not None
    expected = (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    for name in ("plain", "stream"):
        assert (rows[name]["prompt_tokens"], rows[name]["completion_tokens"]) == expected, name
        assert rows[name]["username"] == "alice"
        assert rows[name]["status_code"] == 200
    assert rows["stream"]["stream"] is True


async def test_sdk_streams_closed_right_after_done_are_complete_rows_with_the_sdks_counts(
    stack: Stack,
) -> None:
    """The openai SDK hangs up as soon as it reads [DONE]; llama_cpp.server ends its response a
    moment later. Each such stream is a 200 with the tokens the SDK was told."""
    client = stack.async_client("alice")
    ids, reported = [uuid.uuid4().hex for _ in range(10)], []
    for request_id in ids:
        async for chunk in await client.chat.completions.create(
            model=DEFAULT, messages=MESSAGES, max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Request-Id": request_id},
        ):  # fmt: skip
            if chunk.usage is not None:
                reported.append((chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
    await client.close()
    rows = [await _audit_row(stack.dsn, request_id) for request_id in ids]
    assert [(r["status_code"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, prompt, completion) for prompt, completion in reported
    ]


async def test_anthropic_messages_with_the_real_model_count_as_the_openai_route_does(
    stack: Stack,
) -> None:
    prompt = [{"role": "user", "content": "Name three colours."}]
    request = {"model": DEFAULT, "max_tokens": 12, "system": "Be brief."}
    async with anthropic.AsyncAnthropic(
        base_url=f"{stack.url}/v1", api_key=stack.keys["alice"], max_retries=0
    ) as client:
        counted = await client.messages.count_tokens(
            model=DEFAULT,
            messages=prompt,
            system="Be brief.",  # type: ignore[arg-type]
        )
        plain = await client.messages.create(
            **request,
            messages=prompt,
            extra_headers={"X-Request-Id": "anthropic-plain"},  # type: ignore[arg-type]
        )
        async with client.messages.stream(
            **request,
            messages=prompt,
            extra_headers={"X-Request-Id": "anthropic-stream"},  # type: ignore[arg-type]
        ) as stream:
            streamed = await stream.get_final_message()
    assert plain.content[0].type == "text"
    assert plain.content[0].text
    assert streamed.content[0].type == "text"

    # count_tokens is the exact prompt the backend then saw, the chat template included. Anthropic's
    # input_tokens leaves out what was read from the prompt cache: the whole prompt is their sum.
    def whole(usage: anthropic.types.Usage) -> int:
        return (usage.input_tokens + (usage.cache_read_input_tokens or 0)
                + (usage.cache_creation_input_tokens or 0))  # fmt: skip

    assert counted.input_tokens == whole(plain.usage) == whole(streamed.usage)
    openai_answer = stack.client("alice").chat.completions.create(
        model=DEFAULT, max_tokens=12,
        messages=[{"role": "system", "content": "Be brief."}, *prompt],  # type: ignore[list-item]
        extra_headers={"X-Request-Id": "openai-same-prompt"},
    )  # fmt: skip
    assert openai_answer.usage is not None
    rows = {rid: await _audit_row(stack.dsn, rid)
            for rid in ("anthropic-plain", "anthropic-stream", "openai-same-prompt")}  # fmt: skip
    assert {row["prompt_tokens"] for row in rows.values()} == {counted.input_tokens}
    assert openai_answer.usage.prompt_tokens == counted.input_tokens
    assert rows["anthropic-plain"]["completion_tokens"] == plain.usage.output_tokens
    assert rows["anthropic-stream"]["completion_tokens"] == streamed.usage.output_tokens
    assert {rows[r]["path"] for r in ("anthropic-plain", "anthropic-stream")} == {"/v1/messages"}


class Colour(BaseModel):
    name: str
    rgb: list[int]


def test_structured_output_and_any_request_id_work_with_the_real_model(stack: Stack) -> None:
    """OpenAI's json_schema response_format (what `parse`, LangChain's with_structured_output and
    `llm --schema` send) becomes llama_cpp's schema-constrained JSON; an X-Request-Id that is no
    UUID (which llama_cpp.server alone answers with 400) is kept for the client."""
    client = stack.client("alice")
    answer = client.chat.completions.parse(
        model=DEFAULT,
        messages=[{"role": "user", "content": "Give me one colour as JSON."}],
        response_format=Colour,
        max_tokens=60,
        temperature=0,
        extra_headers={"X-Request-Id": "abc-123"},
    )
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, Colour)
    assert all(isinstance(value, int) for value in parsed.rgb)
    row = asyncio.run(_audit_row(stack.dsn, "abc-123"))
    assert (row["status_code"], row["client_request_id"]) == (200, "abc-123")
    assert row["request_id"] != "abc-123"


async def test_two_users_streaming_at_once_both_get_complete_streams(stack: Stack) -> None:
    async def stream(user: str) -> tuple[str | None, int]:
        client = stack.async_client(user)
        finish, usage = None, 0
        async for chunk in await client.chat.completions.create(
            model=DEFAULT, messages=MESSAGES, max_tokens=40, stream=True,
            stream_options={"include_usage": True}, temperature=0.8, seed=1,
        ):  # fmt: skip
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        await client.close()
        return finish, usage

    results = await asyncio.gather(stream("alice"), stream("bob"))
    for finish, completion_tokens in results:
        # Cut short, a stream would end early with a normal-looking [DONE] and no usage.
        assert finish in {"stop", "length"}
        assert completion_tokens > 0
        if finish == "length":
            assert completion_tokens == 40


async def test_a_client_that_leaves_mid_stream_frees_the_backend_within_a_second(
    stack: Stack,
) -> None:
    client = stack.client("bob")
    quick = {"model": DEFAULT, "messages": MESSAGES, "max_tokens": 1}
    started = time.monotonic()
    await asyncio.to_thread(client.chat.completions.create, **quick)
    idle = time.monotonic() - started

    request_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {stack.keys['bob']}", "X-Request-Id": request_id}
    body = {"model": DEFAULT, "messages": MESSAGES, "max_tokens": 600, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
        for _ in range(3):  # generation is under way
            assert re.match(rb"data: \{", await response.content.readuntil(b"\n\n"))
        response.close()
    left = time.monotonic()
    await asyncio.to_thread(client.chat.completions.create, **quick)
    waited = time.monotonic() - left
    # Had the backend gone on with 600 tokens (~10 s here), the next request would wait for it.
    assert waited - idle < 1.0, f"next request waited {waited:.2f} s (idle: {idle:.2f} s)"
    row = await _audit_row(stack.dsn, request_id)
    assert row["status_code"] == 499
    assert row["response_bytes"] > 0
    # Charged for the prompt and what was generated until it left, not for nothing.
    assert row["prompt_tokens"] > 10
    assert 2 <= row["completion_tokens"] < 600  # it read the role chunk and two more


async def test_a_client_that_leaves_an_unstreamed_request_stops_its_generation(
    stack: Stack,
) -> None:
    """llama_cpp.server notices a departure only while it streams: the proxy always has it
    stream, so an unstreamed request whose client leaves stops as a stream would."""
    client = stack.client("bob")
    quick = {"model": DEFAULT, "messages": MESSAGES, "max_tokens": 1}
    started = time.monotonic()
    await asyncio.to_thread(client.chat.completions.create, **quick)
    idle = time.monotonic() - started
    request_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {stack.keys['bob']}", "X-Request-Id": request_id}
    body = {"model": DEFAULT, "messages": MESSAGES, "max_tokens": 600, "min_tokens": 600}
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(
            http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
        )
        await asyncio.sleep(1.0)  # generation under way
        call.cancel()
    left = time.monotonic()
    next_call = await asyncio.to_thread(client.chat.completions.create, **quick)
    waited = time.monotonic() - left
    assert next_call.choices[0].message is not None
    assert waited - idle < 1.5, f"next request waited {waited:.2f} s (idle: {idle:.2f} s)"
    row = await _audit_row(stack.dsn, request_id)
    assert row["status_code"] == 499
    assert row["queue_ms"] is not None
    assert row["completion_tokens"] > 0


async def test_the_responses_api_with_the_real_model(stack: Stack) -> None:
    """`responses.create` plain and streamed, a function tool round trip and `responses.parse`
    with a json_schema, against SmolLM2; the rows carry the usage the SDK was given."""
    tools: list[Any] = [{
        "type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }]  # fmt: skip
    async with stack.async_client("alice") as client:
        plain = await client.responses.create(
            model=DEFAULT, input="Name three colours.", max_output_tokens=12,
            extra_headers={"X-Request-Id": "responses-plain"},
        )  # fmt: skip
        stream = await client.responses.create(
            model=DEFAULT, input="Name three colours.", max_output_tokens=12, stream=True,
            extra_headers={"X-Request-Id": "responses-stream"},
        )  # fmt: skip
        events = [event async for event in stream]
        called = await client.responses.create(
            model=DEFAULT, input="What is the weather in Paris?", tools=tools,
            tool_choice="required", max_output_tokens=60,
        )  # fmt: skip
        (call,) = [item for item in called.output if item.type == "function_call"]
        answered = await client.responses.create(
            model=DEFAULT, tools=tools, tool_choice="none", max_output_tokens=20,
            input=[{"role": "user", "content": "What is the weather in Paris?"},
                   {"type": "function_call", "call_id": call.call_id, "name": call.name,
                    "arguments": call.arguments},
                   {"type": "function_call_output", "call_id": call.call_id,
                    "output": "Sunny, 21 C"}],
        )  # fmt: skip
        parsed = await client.responses.parse(
            model=DEFAULT, input="Give one colour with its RGB values.", text_format=Colour,
            max_output_tokens=60,
        )  # fmt: skip
    assert plain.output_text
    assert plain.usage is not None
    completed = events[-1]
    assert completed.type in ("response.completed", "response.incomplete")
    assert completed.response.usage is not None  # type: ignore[union-attr]
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert answered.output_text
    assert isinstance(parsed.output_parsed, Colour)
    rows = {
        rid: await _audit_row(stack.dsn, rid) for rid in ("responses-plain", "responses-stream")
    }
    assert rows["responses-plain"]["path"] == "/v1/responses"
    assert rows["responses-plain"]["prompt_tokens"] == plain.usage.input_tokens
    assert rows["responses-plain"]["completion_tokens"] == plain.usage.output_tokens
    streamed_usage = completed.response.usage  # type: ignore[union-attr]
    assert rows["responses-stream"]["completion_tokens"] == streamed_usage.output_tokens


async def _rows_of(dsn: str, user: str) -> list[asyncpg.Record]:
    """The user's rows once they are written (the audit writer writes about once a second),
    and none arrives for two seconds more."""
    con = await asyncpg.connect(dsn)
    query = "SELECT path, status_code, error FROM llama_requests WHERE username = $1 ORDER BY id"
    try:
        deadline = time.monotonic() + 10
        rows = await con.fetch(query, user)
        while not rows and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            rows = await con.fetch(query, user)
        await asyncio.sleep(2)
        return await con.fetch(query, user)
    finally:
        await con.close()


@pytest.mark.parametrize("agent", ["codex", "claude"])
async def test_a_coding_agent_shows_the_over_context_error_once(
    stack: Stack, agent: str, tmp_path: Path
) -> None:
    """Their prompts are far past SmolLM2's context: each agent shows the user the error in one
    line and retries nothing (one request, one row)."""
    binary = CODEX if agent == "codex" else CLAUDE
    needs(binary)
    user = f"agent-{agent}"
    key = _create_user(stack.dsn, user)
    if agent == "codex":
        code, out, err = await codex(f"{stack.url}/v1", key, tmp_path, DEFAULT, "say hi")
    else:
        code, out, err = await claude(stack.url, key, tmp_path, DEFAULT, "say hi")
    assert code != 0
    said = [line for line in (out + err).splitlines() if "context" in line or "too long" in line]
    assert said, out + err
    print(agent, "said:", *said, sep="\n  ")
    rows = await _rows_of(stack.dsn, user)
    assert len(rows) == 1, rows
    assert rows[0]["status_code"] == 400


async def test_a_stored_response_continues_at_another_proxy_process(
    stack: Stack, tmp_path: Path
) -> None:
    """`previous_response_id` across two proxy processes sharing Postgres, with the real model;
    retrieve and delete at the other; another user's id is a 404."""
    environ = {**stack.environ, "LLAMA_GATE_HOME": str(tmp_path)}
    with proxy_process(environ) as other_url:
        async with (
            stack.async_client("alice") as here,
            openai.AsyncOpenAI(
                base_url=f"{other_url}/v1", api_key=stack.keys["alice"], max_retries=0
            ) as there,
            openai.AsyncOpenAI(
                base_url=f"{other_url}/v1", api_key=stack.keys["bob"], max_retries=0
            ) as bob,
        ):
            first = await here.responses.create(
                model=DEFAULT, input="My name is Ada.", max_output_tokens=12
            )
            second = await there.responses.create(
                model=DEFAULT, input="What is my name?", previous_response_id=first.id,
                max_output_tokens=12,
            )  # fmt: skip
            assert second.previous_response_id == first.id
            assert second.usage is not None
            assert first.usage is not None
            # The whole conversation was the prompt: more than this turn's words alone.
            assert second.usage.input_tokens > first.usage.input_tokens
            assert (await there.responses.retrieve(first.id)).output_text == first.output_text
            with pytest.raises(openai.NotFoundError):
                await bob.responses.retrieve(first.id)
            await there.responses.delete(second.id)
            with pytest.raises(openai.NotFoundError):
                await here.responses.retrieve(second.id)
