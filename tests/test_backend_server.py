"""End to end: the real `python -m backend serve` with SmolLM2, started once for this module.

The home has the real GGUF twice (a second alias is a symlink to it), so model selection and the
404 can be shown without a second download.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types import CompletionUsage

from tests.backend_harness import DEFAULT, Backend, running_backend

pytestmark = pytest.mark.slow

OTHER = "smol-b"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with running_backend(tmp_path_factory.mktemp("backend-home"), OTHER) as server:
        yield server


@pytest.fixture(scope="module")
def client(backend: Backend) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{backend.url}/v1", api_key=backend.key, max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def sse(response: aiohttp.ClientResponse) -> list[str]:
    """Every `data:` payload of a server-sent event stream, in order ([DONE] included)."""
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
    return events


async def status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers) as response:
        return response.status


def chunks(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(event) for event in events[:-1]]


def settle(client: openai.OpenAI) -> None:
    """Generate one token for an unrelated prompt.

    llama.cpp reuses the KV cache of a prompt's common prefix with the previous request, so the
    same prompt twice in a row is computed two ways (whole batch, then one token), and greedy
    decoding may then differ in the last bits. A request in between makes both runs of a
    prompt start from the same state, so their outputs may be compared token for token.
    """
    client.completions.create(model=DEFAULT, prompt="Unrelated.", max_tokens=1, temperature=0)


def counts(usage: CompletionUsage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


# -- /health, auth, model selection ----------------------------------------------------------


async def test_health_needs_no_key_and_names_the_models(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{backend.url}/health") as response:
        assert response.status == 200
        health = await response.json()
    cache = health.pop("prompt_cache")
    pid, limits, evaluated = health.pop("pid"), health.pop("limits"), health.pop("evaluated_tokens")
    assert health == {"status": "ok", "models": [DEFAULT, OTHER], "default": DEFAULT}
    assert isinstance(pid, int)  # the model server's, a child of `serve`
    assert pid != os.getpid()
    assert isinstance(evaluated, int)
    assert set(limits) == {DEFAULT, OTHER}
    assert limits[DEFAULT]["n_ctx"] == 1024
    assert limits[DEFAULT]["n_vocab"] == 49152
    assert 10 < limits[DEFAULT]["max_token_bytes"] <= 256
    assert 0 < limits[DEFAULT]["overhead"] < 300
    assert cache["mode"] == "ram"  # the default, with the budget the machine allows
    assert cache["capacity_bytes"] >= 64 << 20
    assert set(cache) == {
        "mode",
        "states",
        "bytes",
        "capacity_bytes",
        "hits",
        "misses",
        "evictions",
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}],
    ids=["no-key", "wrong-key", "not-bearer"],
)
async def test_generation_needs_the_api_key(
    backend: Backend, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    for model in (DEFAULT, "no-such-model"):  # a 401 comes before any model check
        body = {"model": model, "prompt": "Hi", "max_tokens": 1}
        async with http.post(
            f"{backend.url}/v1/completions", json=body, headers=headers
        ) as response:
            assert response.status == 401, await response.text()


def test_the_api_key_opens_generation(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=DEFAULT, prompt="Hi", max_tokens=1)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 1


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/extras/tokenize"]
)
async def test_unknown_model_is_a_404_in_openai_shape(
    backend: Backend, http: aiohttp.ClientSession, path: str
) -> None:
    body = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": "Hi"}],
        "prompt": "Hi",
        "input": "Hi",
        "max_tokens": 1,
    }
    async with http.post(f"{backend.url}{path}", json=body, headers=backend.auth) as response:
        assert response.status == 404
        error = await response.json()
    assert error == {
        "error": {
            "message": error["error"]["message"],
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert "gpt-4" in error["error"]["message"]
    assert DEFAULT in error["error"]["message"]


def test_openai_client_sees_the_404_as_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    assert raised.value.code == "model_not_found"


async def test_a_request_picks_its_model_and_none_means_the_default(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    url = f"{backend.url}/v1/completions"
    for sent, served in ((OTHER, OTHER), (None, DEFAULT), (DEFAULT, DEFAULT)):
        body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 1}
        if sent is not None:
            body["model"] = sent
        async with http.post(url, json=body, headers=backend.auth) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["model"] == served


# -- the usage chunk ---------------------------------------------------------------------------

CHAT_CASES = {
    # (messages, max_tokens, how the unstreamed answer must end for the case to mean something)
    "ends-on-eos": ([{"role": "user", "content": "Reply with just the word yes."}], 48, "stop"),
    "ends-on-length": ([{"role": "user", "content": "Tell me a story about a cat."}], 12, "length"),
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_streamed_chat_usage_equals_unstreamed_usage(client: openai.OpenAI, case: str) -> None:
    messages, max_tokens, finish = CHAT_CASES[case]
    request: Any = {
        "model": DEFAULT,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 7,
    }
    settle(client)
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].finish_reason == finish
    settle(client)
    stream = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    *body, last = stream
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert counts(last.usage) == counts(whole.usage)
    assert all(chunk.usage is None for chunk in body)
    assert body[-1].choices[0].finish_reason == finish
    text = "".join(chunk.choices[0].delta.content or "" for chunk in body)
    assert text == whole.choices[0].message.content


COMPLETION_CASES = {
    # A stop sequence ends generation on a token that is counted, unlike the end-of-text token.
    "ends-on-stop-sequence": ("The capital of France is", ["\n", "."], 24, "stop"),
    "ends-on-length": ("1, 2, 3,", None, 16, "length"),
}


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_streamed_completion_usage_equals_unstreamed_usage(
    client: openai.OpenAI, case: str
) -> None:
    prompt, stop, max_tokens, finish = COMPLETION_CASES[case]
    request: Any = {
        "model": DEFAULT,
        "prompt": prompt,
        "stop": stop,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 7,
    }
    settle(client)
    whole = client.completions.create(**request)
    assert whole.choices[0].finish_reason == finish
    settle(client)
    stream = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    *body, last = stream
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert counts(last.usage) == counts(whole.usage)
    assert "".join(chunk.choices[0].text for chunk in body) == whole.choices[0].text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_usage_chunk_is_the_last_before_done_and_only_when_asked(
    backend: Backend, http: aiohttp.ClientSession, path: str
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "prompt": "Hi",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    url = f"{backend.url}{path}"
    asked = {**body, "stream_options": {"include_usage": True}}
    async with http.post(url, json=asked, headers=backend.auth) as response:
        assert response.status == 200
        with_usage = chunks(await sse(response))
    *rest, last = with_usage
    assert last["choices"] == []
    assert set(last["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
    }
    assert (
        0
        <= last["usage"]["prompt_tokens_details"]["cached_tokens"]
        < last["usage"]["prompt_tokens"]
    )
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    assert last["id"] == rest[0]["id"]
    assert last["model"] == DEFAULT
    assert all("usage" not in chunk and chunk["choices"] for chunk in rest)

    async with http.post(url, json=body, headers=backend.auth) as response:
        plain = chunks(await sse(response))
    assert all("usage" not in chunk and chunk["choices"] for chunk in plain)
    # Dropping the usage event leaves what a client that did not ask gets (ids aside).
    unstamped = [{k: v for k, v in c.items() if k not in {"id", "created"}} for c in rest]
    assert unstamped == [{k: v for k, v in c.items() if k not in {"id", "created"}} for c in plain]
    assert plain[-1]["choices"][0]["finish_reason"] == "length"


async def test_the_prompts_usage_comes_first_when_the_proxy_asks_for_progress(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count from one to ten."}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True, "llama_gate_progress": True},
    }
    url = f"{backend.url}/v1/chat/completions"
    async with http.post(url, json=body, headers=backend.auth) as response:
        events = chunks(await sse(response))
    first, *answer, last = events
    # Told before the prompt was processed, with the same count the last usage has.
    assert first["choices"] == []
    assert first["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] > 0
    assert first["usage"]["completion_tokens"] == 0
    assert last["usage"]["completion_tokens"] == 6
    assert all(chunk["choices"] for chunk in answer)


async def test_the_prompt_is_counted_as_a_completion_counts_it_without_processing_it(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    """What llama-gate's proxy asks (a stream; tools written into the prompt) is counted to the
    token, for chats with and without tools, text completions and embeddings."""
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."},
        ],
        "max_tokens": 2,
    }
    tools = [{"type": "function", "function": {
        "name": "get", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    for path, request in (
        ("/v1/chat/completions", body),
        ("/v1/chat/completions", {**body, "tools": tools}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2}),
    ):
        async with http.post(
            f"{backend.url}/llama-gate/prompt-tokens", json=request, headers=backend.auth
        ) as response:
            assert response.status == 200
            counted = await response.json()
        streamed = {**request, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(
            f"{backend.url}{path}", json=streamed, headers=backend.auth
        ) as response:
            events = [line for line in (await response.text()).splitlines() if "usage" in line]
        usage = json.loads(events[-1].removeprefix("data: "))["usage"]
        assert counted["prompt_tokens"] == usage["prompt_tokens"] > 3, request
        assert counted["n_ctx"] == 1024
    with_tools = {**body, "tools": tools}
    async with http.post(
        f"{backend.url}/llama-gate/prompt-tokens", json=with_tools, headers=backend.auth
    ) as response:
        assert (await response.json())["prompt_tokens"] > 100  # the tools' instructions
    embeddings = {"input": ["hello there", "general kenobi"]}
    async with http.post(
        f"{backend.url}/llama-gate/prompt-tokens", json=embeddings, headers=backend.auth
    ) as response:
        counted = await response.json()
    async with http.post(
        f"{backend.url}/v1/embeddings", json=embeddings, headers=backend.auth
    ) as response:
        assert counted["prompt_tokens"] == (await response.json())["usage"]["prompt_tokens"]
    assert sum(counted["inputs"]) == counted["prompt_tokens"]
    async with http.post(
        f"{backend.url}/llama-gate/prompt-tokens", json={"messages": "x"}, headers=backend.auth
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "messages"


async def test_what_llama_cpp_cannot_serve_is_a_400_and_the_process_lives(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    """Each of these once killed the model server or failed half-way through a stream."""
    async with http.get(f"{backend.url}/health") as response:
        pid = (await response.json())["pid"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("/v1/chat/completions", {**chat, "grammar": "root ::= x"}, "grammar", "invalid_grammar"),
        ("/v1/chat/completions", {**chat, "grammar": "root ::= x", "stream": True}, "grammar",
         "invalid_grammar"),
        ("/v1/completions", {"prompt": "Hi", "grammar": "root ::= [", "stream": True},
         "grammar", "invalid_grammar"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"999999": 5}, "stream": True},
         "logit_bias", "invalid_logit_bias"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"abc": 5}}, "logit_bias",
         "invalid_logit_bias"),
        ("/v1/completions", {"prompt": [1, 2, 3], "stream": True}, "prompt", "invalid_prompt"),
        ("/v1/completions", {"prompt": "", "stream": True}, "prompt", "empty_prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}], "stream": True},
         "messages", "template_error"),
        ("/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "word " * 3000}], "stream": True},
         "messages", "context_length_exceeded"),
        ("/v1/embeddings", {"input": ["x " * 3000]}, "input", "context_length_exceeded"),
        ("/v1/chat/completions", {**chat, "stream": True, "tools": [{"type": "function",
            "function": {"name": "a", "parameters": {"type": "string", "minLength": 5000}}}]},
         "tools[0].function.parameters", "invalid_tools"),
    ]  # fmt: skip
    for path, request, param, code in cases:
        async with http.post(f"{backend.url}{path}", json=request, headers=backend.auth) as r:
            answer = await r.json()
            assert r.status == 400, (request, answer)
        assert (answer["error"]["param"], answer["error"]["code"]) == (param, code), answer
    async with http.post(
        f"{backend.url}/v1/chat/completions", json=chat, headers=backend.auth
    ) as response:
        assert response.status == 200
    async with http.get(f"{backend.url}/health") as response:
        assert (await response.json())["pid"] == pid


async def test_the_stop_sequence_that_ended_a_stream_is_named(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    """llama_cpp says only finish_reason "stop"; Anthropic's API names the sequence."""
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 9, separated by commas."}],
        "max_tokens": 40,
        "temperature": 0,
        "stop": ["7", "never-said"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(
        f"{backend.url}/v1/chat/completions", json=body, headers=backend.auth
    ) as response:
        *answer, last = chunks(await sse(response))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in answer)
    assert "7" not in text
    assert answer[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["llama_gate"] == {"stop_sequence": "7"}


# -- sharing the one model ---------------------------------------------------------------------


async def test_health_answers_while_a_long_generation_holds_the_model(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    # min_tokens holds off the end-of-text token, so this runs for all 160 tokens (seconds).
    body = {"prompt": "1, 2, 3,", "max_tokens": 160, "min_tokens": 160, "stream": True}
    async with http.post(
        f"{backend.url}/v1/completions", json=body, headers=backend.auth
    ) as stream:
        assert stream.status == 200
        await stream.content.readline()  # generation is under way: the model lock is taken
        # llama_cpp.server's own /v1/models waits for that lock: proof that it is held.
        models = asyncio.create_task(status(http, f"{backend.url}/v1/models", backend.auth))
        started = time.monotonic()
        async with http.get(f"{backend.url}/health") as health:
            assert health.status == 200
        answered = time.monotonic() - started
        await asyncio.sleep(0.2)
        assert not models.done(), "the model lock was free: this test proves nothing"
        rest = await sse(stream)
        generated = time.monotonic() - started
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert await models == 200
    assert answered < 0.5, answered
    assert generated > 5 * answered, (generated, answered)


async def test_two_concurrent_streams_both_run_to_the_end(
    backend: Backend, http: aiohttp.ClientSession
) -> None:
    max_tokens = 20

    async def stream(topic: str) -> list[dict[str, Any]]:
        body = {
            "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(
            f"{backend.url}/v1/chat/completions", json=body, headers=backend.auth
        ) as response:
            assert response.status == 200
            return chunks(await sse(response))

    first, second = await asyncio.gather(stream("a dog"), stream("a ship"))
    for events in (first, second):
        # llama_cpp.server's default (interrupt_requests) would end the first stream with a
        # bare [DONE] as soon as the second waited: no finish_reason, fewer tokens.
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == max_tokens


def test_embeddings_are_one_vector_per_input(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model=DEFAULT, input=["hello world", "a cat"])
    assert [item.index for item in answer.data] == [0, 1]
    vectors = [item.embedding for item in answer.data]
    assert len(vectors[0]) == len(vectors[1]) > 100
    assert all(isinstance(value, float) for value in vectors[0])
    assert vectors[0] != vectors[1]
    assert answer.usage.prompt_tokens > 0
    single = client.embeddings.create(model=DEFAULT, input="hello world")
    assert single.data[0].embedding == pytest.approx(vectors[0], abs=1e-4)
    # Generation still works (and at full speed: the embedding context is a separate one).
    chat = client.chat.completions.create(
        model=DEFAULT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.usage is not None
    assert chat.usage.completion_tokens > 0


async def test_embeddings_refuse_a_bad_input_in_openai_shape(
    http: aiohttp.ClientSession, backend: Backend
) -> None:
    url = f"{backend.url}/v1/embeddings"
    async with http.post(url, json={"input": 42}, headers=backend.auth) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "input"
