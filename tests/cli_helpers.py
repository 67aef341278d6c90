"""Running the admin CLI in-process, the way a user would from a shell."""

from __future__ import annotations

import re

from click.testing import CliRunner, Result

from proxy.cli.main import cli

KEY_RE = re.compile(r"lgk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def invoke(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def ok(env: dict[str, str], *args: str) -> str:
    result = invoke(env, *args)
    assert result.exit_code == 0, result.output
    return result.output


def failure(env: dict[str, str], *args: str, input: str | None = None) -> str:
    """Run a command that must fail cleanly: non-zero, and stderr is one `Error: ` line (no
    Usage: or Try ... lines, no traceback)."""
    result = invoke(env, *args, input=input)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    return result.stderr


def new_key(env: dict[str, str], username: str, *extra: str) -> str:
    output = ok(env, "create-user", "--username", username, *extra)
    match = KEY_RE.search(output)
    assert match, output
    return match.group(0)
