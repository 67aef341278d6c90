"""The coding agents teams point at a shared model, run for real, headless, against the proxy:
Codex (`codex exec`, the Responses API) and Claude Code (`claude -p`, the Messages API).

Against a fake backend: each prints the fake's answer, exits 0, leaves one row per request with
tokens, and a tool call from the fake reaches the agent as a call to its own tool, which it runs
(a shell command, in a temporary directory) and answers with the command's output. The agents
are installed by `runtime/install.sh --dev` (npm, in runtime/agents); without them these tests
are skipped, saying so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backend.tools import plan
from tests.agent_helpers import CLAUDE, CODEX, claude, codex, needs
from tests.proxy_harness import Harness, running_proxy

MODEL = "smollm2-test"

pytestmark = pytest.mark.slow


@pytest.fixture
async def proxy(db_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_proxy(db_dsn, tmp_path / "home") as harness:
        harness.upstream.event_delay = harness.upstream.tail_delay = 0.0
        yield harness


async def test_codex_prints_the_models_answer(proxy: Harness, tmp_path: Path) -> None:
    needs(CODEX)
    key = await proxy.user("alice")
    code, out, err = await codex(proxy.url("/v1"), key, tmp_path, MODEL, "say hi")
    assert code == 0, err
    assert "Hello world" in out
    rows = await proxy.wait_for_records(len(proxy.upstream.seen))
    assert rows
    assert {(r.path, r.status_code) for r in rows} == {("/v1/responses", 200)}
    assert all(r.prompt_tokens and r.completion_tokens for r in rows)
    sent = json.loads(proxy.upstream.seen[0].body)
    assert sent["tools"]  # its own tools reached the backend as chat tools
    _generable(sent)


async def test_codex_runs_the_shell_command_the_model_calls(proxy: Harness, tmp_path: Path) -> None:
    needs(CODEX)
    key = await proxy.user("alice")
    proxy.upstream.script = [
        {"tool_calls": [{"id": "call_1", "name": "exec_command",
                         "arguments": {"cmd": "echo made-by-codex"}}]},
        {"content": "The command printed made-by-codex."},
    ]  # fmt: skip
    code, out, err = await codex(proxy.url("/v1"), key, tmp_path, MODEL, "run echo")
    assert code == 0, err
    assert "The command printed made-by-codex." in out
    second = json.loads(proxy.upstream.seen[-1].body)
    results = [m for m in second["messages"] if m["role"] == "tool"]
    assert results
    assert "made-by-codex" in results[-1]["content"]
    rows = await proxy.wait_for_records(len(proxy.upstream.seen))
    assert {r.path for r in rows} == {"/v1/responses"}


def _tools_named(body: dict[str, Any]) -> list[str]:
    return [tool["function"]["name"] for tool in body.get("tools") or ()]


async def test_claude_code_prints_the_models_answer(proxy: Harness, tmp_path: Path) -> None:
    needs(CLAUDE)
    key = await proxy.user("alice")
    code, out, err = await claude(proxy.url("/"), key, tmp_path, MODEL, "say hi")
    assert code == 0, out + err
    assert "Hello world" in out
    rows = await proxy.wait_for_records(len(proxy.upstream.seen))
    assert rows
    assert {(r.path, r.status_code) for r in rows} == {("/v1/messages", 200)}
    assert all(r.prompt_tokens and r.completion_tokens for r in rows)
    sent = json.loads(proxy.upstream.seen[-1].body)
    assert "Bash" in _tools_named(sent)
    _generable(sent)


async def test_claude_code_runs_the_shell_command_the_model_calls(
    proxy: Harness, tmp_path: Path
) -> None:
    needs(CLAUDE)
    key = await proxy.user("alice")
    proxy.upstream.script = [
        {"tool_calls": [{"id": "call_1", "name": "Bash",
                         "arguments": {"command": "echo made-by-claude",
                                       "description": "Print a word"}}]},
        {"content": "The command printed made-by-claude."},
    ]  # fmt: skip
    allowed = ("--allowedTools", "Bash")
    code, out, err = await claude(proxy.url("/"), key, tmp_path, MODEL, "run echo", *allowed)
    assert code == 0, out + err
    assert "The command printed made-by-claude." in out
    bodies = [json.loads(seen.body) for seen in proxy.upstream.seen]
    results = [m for body in bodies for m in body["messages"] if m["role"] == "tool"]
    assert results
    assert "made-by-claude" in results[-1]["content"]


def _generable(body: dict[str, Any]) -> None:
    """Every tool the agent sent can be turned into the grammar llama-gate's backend constrains
    a call with (one schema it could not take was a 400 on the agent's first request)."""
    served = plan(body, None)
    assert served is not None
    assert served.grammar is not None
