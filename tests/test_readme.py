"""README.md keeps up with the code: every setting, admin command and console command is there,
and CI runs exactly the test command it gives a new user."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.cli.main import cli
from proxy.settings import KNOWN_VARIABLES, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _table_rows(heading: str) -> dict[str, list[str]]:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) >= 2:
            rows[cells[0].strip("`").split("`")[0]] = cells[1:]
    return rows


def test_every_setting_is_in_the_settings_table_with_its_default(tmp_path: Path) -> None:
    rows = _table_rows("Settings")
    assert set(rows) == set(KNOWN_VARIABLES)
    defaults = load_settings(environ={}, home=tmp_path)
    assert rows["LLAMA_PROXY_PORT"][0] == f"`{defaults.proxy_port}`"
    assert rows["LLAMA_PROXY_RATE_LIMIT"][0] == f"`{defaults.rate_limit}`"
    assert rows["MAX_TOKENS_HARD_CAP"][0] == f"`{defaults.max_tokens_hard_cap}`"
    assert rows["LLAMA_PROXY_METRICS_PORT"][0] == f"`{defaults.metrics_port}`"


def test_every_admin_command_is_in_the_cli_table() -> None:
    documented = {name.split()[0] for name in _table_rows("Admin CLI")}
    documented |= {"enable-user"}  # shares a row with disable-user
    assert set(cli.commands) == documented


def test_every_console_command_is_documented() -> None:
    script = (ROOT / "bin" / "console.sh").read_text()
    commands = set(re.findall(r"^  ([a-z-]+)\)", script, flags=re.MULTILINE))
    documented = set()
    for name in _table_rows("Running the stack"):
        documented |= set(name.split()[0].split("/"))
    documented |= {"restart"}  # shares a row with stop
    assert commands == documented


def test_ci_runs_the_readme_test_command() -> None:
    two_commands = README.split("## Two commands\n", 1)[1].split("```bash\n", 1)[1]
    test_line = next(line for line in two_commands.splitlines() if "test" in line)
    command = test_line.split("#")[0].strip()
    assert command == "bin/test.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert [
        line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))
    ] == [command]


def test_the_layout_table_names_every_module_of_the_proxy() -> None:
    layout = README.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    modules = {
        path.relative_to(ROOT / "proxy")
        for path in (ROOT / "proxy").rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"} and "migrations" not in path.parts
    }
    missing = [str(module) for module in sorted(modules) if f"{module.name}`" not in layout]
    assert not missing, f"README's layout table does not mention {missing}"
    folders = {module.parts[0] for module in modules if len(module.parts) > 1}
    assert all(f"`proxy/{folder}/`" in layout for folder in folders)
