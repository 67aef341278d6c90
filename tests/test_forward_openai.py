"""The `openai` package, as users will run it, works through the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from tests.proxy_harness import Harness, running_proxy


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path) as harness:
        yield harness


@pytest.fixture
async def client(proxy: Harness) -> AsyncIterator[openai.AsyncOpenAI]:
    key = await proxy.user("alice")
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/v1"), api_key=key, max_retries=0, timeout=10
    ) as client:
        yield client


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


async def test_chat(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="smollm2-test", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello world"
    assert reply.usage is not None
    assert reply.usage.total_tokens == 7


async def test_streamed_chat(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="smollm2-test", messages=MESSAGES, stream=True
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p for p in pieces if p) == "Hello world"


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]
    assert models == ["smollm2-test"]
    assert (await client.models.retrieve("smollm2-test")).id == "smollm2-test"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="smollm2-test", input=["a", "b"])
    assert [item.embedding for item in result.data] == [[0.1, 0.2, 0.3]] * 2


async def test_errors_reach_the_client_as_its_own_exceptions(proxy: Harness) -> None:
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/v1"), api_key="lgk_wrong", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as raised:
            await bad.models.list()
    assert raised.value.code == "invalid_api_key"
    key = await proxy.user("bob", rate_limit=1, rate_window_seconds=60)
    async with openai.AsyncOpenAI(base_url=proxy.url("/v1"), api_key=key, max_retries=0) as ok:
        await ok.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            await ok.models.list()
    assert limited.value.code == "rate_limit_exceeded"
