"""The coding agents' command lines and settings, as README gives them (tests drive them)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.proxy_harness import ROOT

AGENTS = ROOT / "runtime" / "agents" / "node_modules" / ".bin"
CODEX, CLAUDE = AGENTS / "codex", AGENTS / "claude"


def needs(binary: Path) -> None:
    if not binary.exists() or shutil.which("node") is None:
        pytest.skip(
            f"{binary.name} is not installed (runtime/install.sh --dev installs it with npm)"
        )


async def run_agent(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 180)
    except TimeoutError:
        process.kill()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def codex_config(base_url: str, model: str) -> str:
    """The config.toml README gives for Codex (the base URL and model differ per deployment).
    Codex's hosted tools (web search) and its sub-agent and goal tools (tool types and
    namespaces the Responses API keeps for OpenAI's own models) are turned off: a local model
    gets Codex's function tools only."""
    return f"""model = "{model}"
model_provider = "llama-gate"
web_search = "disabled"

[model_providers.llama-gate]
name = "llama-gate"
base_url = "{base_url}"
env_key = "LLAMA_GATE_API_KEY"
wire_api = "responses"

[agents]
enabled = false

[features]
goals = false
"""


def claude_env(base_url: str, key: str, home: Path, model: str) -> dict[str, str]:
    """The environment README gives for Claude Code."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,  # its small background requests too
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }


async def codex(
    base_url: str, key: str, where: Path, model: str, prompt: str
) -> tuple[int, str, str]:
    """`codex exec PROMPT` in `where`/work, configured as README says: exit code, out, err."""
    home = where / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(codex_config(base_url, model))
    work = where / "work"
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(where), "CODEX_HOME": str(home),
           "LLAMA_GATE_API_KEY": key}  # fmt: skip
    args = [str(CODEX), "exec", "--skip-git-repo-check", "--color", "never",
            "--dangerously-bypass-approvals-and-sandbox", prompt]  # fmt: skip
    return await run_agent(args, env, work)


async def claude(
    base_url: str, key: str, where: Path, model: str, prompt: str, *more: str
) -> tuple[int, str, str]:
    """`claude -p PROMPT` in `where`/work, with README's environment: exit code, out, err."""
    work = where / "work"
    work.mkdir(exist_ok=True)
    env = claude_env(base_url, key, where, model)
    return await run_agent([str(CLAUDE), "-p", prompt, *more], env, work)
