"""`python -m backend models | config | serve`: what they list and write, and how they refuse.

None of these loads a model: every refusal happens before that, in one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from backend.cli import main
from proxy.db.localpg import free_port
from proxy.settings import KNOWN_VARIABLES

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = "SmolLM2-135M-Instruct.Q4_1"
KEY = "backend-test-key-not-for-logs"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home whose models/ holds the real GGUF under two names, and a stray non-model file."""
    models = tmp_path / "models"
    models.mkdir()
    (models / GGUF.name).symlink_to(GGUF)
    (models / "smol-b.gguf").symlink_to(GGUF)
    (models / "README.md").write_text("not a model\n")
    (models / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")  # dangling: not served
    return tmp_path


def env_for(home: Path, **settings: str) -> dict[str, str | None]:
    """Settings for an in-process run: only `settings`, whatever this shell has set."""
    cleared: dict[str, str | None] = {name: None for name in KNOWN_VARIABLES | {"CONFIG_FILE"}}
    return {**cleared, "LLAMA_GATE_HOME": str(home), **settings}


def run(home: Path, *args: str, **settings: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env_for(home, **settings))


def one_error(result: Result) -> str:
    """The single `Error:` line of a clean failure."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def run_process(home: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES | {"CONFIG_FILE"}}
    env.update(LLAMA_GATE_HOME=str(home), **settings)
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- models ------------------------------------------------------------------------------------


def test_models_lists_every_gguf_with_its_size_and_marks_the_default(home: Path) -> None:
    result = run(home, "models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2, result.output
    assert lines[0].startswith(f"* {DEFAULT} ")
    assert lines[1].startswith("  smol-b ")
    assert all("93.8 MiB" in line for line in lines)
    assert lines[1].endswith(str(home / "models" / "smol-b.gguf"))

    for name in ("smol-b", "smol-b.gguf"):  # the alias, or the file name as console.sh takes
        moved = run(home, "models", LLAMA_MODEL=name).output.splitlines()
        assert moved[0].startswith("  ")
        assert moved[1].startswith("* smol-b ")


def test_models_with_an_unknown_default_lists_them_then_fails(home: Path) -> None:
    result = run(home, "models", LLAMA_MODEL="llama-70b")
    assert "smol-b" in result.stdout
    error = one_error(result)
    assert "LLAMA_MODEL='llama-70b'" in error
    assert f"{DEFAULT}, smol-b" in error


@pytest.mark.parametrize("command", ["models", "config", "serve"])
def test_no_gguf_at_all_says_to_run_the_installer(tmp_path: Path, command: str) -> None:
    (tmp_path / "models").mkdir()
    error = one_error(run(tmp_path, command, LLAMA_SERVER_API_KEY=KEY))
    assert "no *.gguf" in error
    assert "runtime/install.sh" in error


# -- config ------------------------------------------------------------------------------------


def test_config_writes_llama_cpp_server_config_with_the_default_first(home: Path) -> None:
    result = run(
        home,
        "config",
        LLAMA_MODEL="smol-b",
        LLAMA_SERVER_API_KEY=KEY,
        LLAMA_SERVER_PORT="8123",
        N_CTX="4096",
        N_GPU_LAYERS="-1",
        LLAMA_PROMPT_CACHE="1",
        LLAMA_CHAT_FORMAT="chatml",
    )
    assert result.exit_code == 0, result.output
    path = home / "runtime" / "backend-config.json"
    assert result.output == f"{path}\n"
    text = path.read_text()
    assert KEY not in text
    config = json.loads(text)
    assert "api_key" not in config
    assert config["host"] == "127.0.0.1"
    assert config["port"] == 8123
    assert config["interrupt_requests"] is False
    assert [m["model_alias"] for m in config["models"]] == ["smol-b", DEFAULT]
    first = config["models"][0]
    assert first["model"] == str(home / "models" / "smol-b.gguf")
    assert (first["n_ctx"], first["n_gpu_layers"], first["chat_format"]) == (4096, -1, "chatml")
    # The backend brings its own prompt cache; logits for every token would bloat its states.
    assert (first["cache"], first["logits_all"]) == (False, False)


def test_config_leaves_chat_format_and_threads_to_llama_cpp_when_unset(home: Path) -> None:
    assert run(home, "config").exit_code == 0
    model = json.loads((home / "runtime" / "backend-config.json").read_text())["models"][0]
    assert model["chat_format"] is None  # the template stored in the GGUF
    assert model["n_threads"] >= 1  # 0 would fail llama_cpp.server's own check
    assert model["cache"] is False
    assert model["logits_all"] is False  # the prompt cache is on (in RAM) by default


def test_with_the_prompt_cache_off_the_model_keeps_every_logit_for_logprobs(home: Path) -> None:
    assert run(home, "config", LLAMA_PROMPT_CACHE="off").exit_code == 0
    model = json.loads((home / "runtime" / "backend-config.json").read_text())["models"][0]
    assert (model["cache"], model["logits_all"]) == (False, True)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LLAMA_MODEL", "nope", f"the models there are: {DEFAULT}, smol-b"),
        ("N_GPU_LAYERS", "-4", "N_GPU_LAYERS=-4: input should be greater than or equal to -1"),
        ("N_THREADS", "-3", "N_THREADS='-3' from environment: must be at least 0"),
        ("N_CTX", "lots", "N_CTX='lots' from environment: must be a whole number"),
        ("LLAMA_CHAT_FORMAT", "klingon", "LLAMA_CHAT_FORMAT='klingon' is not a chat format"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    home: Path, variable: str, value: str, expected: str
) -> None:
    for command in ("config", "serve"):
        error = one_error(run(home, command, LLAMA_SERVER_API_KEY=KEY, **{variable: value}))
        assert expected in error, error
    assert not (home / "runtime" / "backend-config.json").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "backend.example"])  # noqa: S104
def test_a_non_loopback_host_is_refused_unless_allowed(home: Path, host: str) -> None:
    for command in ("config", "serve"):
        error = one_error(run(home, command, LLAMA_SERVER_HOST=host, LLAMA_SERVER_API_KEY=KEY))
        assert f"LLAMA_SERVER_HOST={host} is not a loopback address" in error
        assert "LLAMA_SERVER_ALLOW_REMOTE=1" in error
    allowed = run(home, "config", LLAMA_SERVER_HOST=host, LLAMA_SERVER_ALLOW_REMOTE="1")
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_need_no_permission(home: Path, host: str) -> None:
    result = run(home, "config", LLAMA_SERVER_HOST=host)
    assert result.exit_code == 0, result.output


# -- serve (refusals only; tests/test_backend_server.py runs it for real) -----------------------


def test_serve_refuses_to_run_without_the_api_key(home: Path) -> None:
    error = one_error(run(home, "serve"))
    assert "LLAMA_SERVER_API_KEY is empty" in error
    assert "runtime/install.sh" in error


def test_serve_on_a_taken_port_exits_with_one_line(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_process(home, "serve", LLAMA_SERVER_PORT=str(port), LLAMA_SERVER_API_KEY=KEY)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"Error: port {port} on 127.0.0.1 is already in use (is a backend already running?); "
        f"stop that process or set another LLAMA_SERVER_PORT"
    ]


def test_serve_refusal_is_one_line_from_the_real_command(home: Path) -> None:
    done = run_process(home, "serve", LLAMA_SERVER_HOST="0.0.0.0", LLAMA_SERVER_API_KEY=KEY)  # noqa: S104
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("Error: LLAMA_SERVER_HOST=0.0.0.0 is not a loopback address")
    assert KEY not in done.stderr


def test_a_file_that_is_no_model_fails_to_load_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.gguf").write_bytes(b"not a GGUF file" * 64)
    port = str(free_port())
    done = run_process(tmp_path, "serve", LLAMA_SERVER_PORT=port, LLAMA_SERVER_API_KEY=KEY)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: cannot load model broken: Failed to load model from file: "
        f"{tmp_path / 'models' / 'broken.gguf'}"
    ], done.stderr
    assert "Traceback" not in done.stderr


def test_each_command_documents_itself_with_an_example(home: Path) -> None:
    for command in ("serve", "models", "config"):
        result = run(home, command, "--help")
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output
        assert f"python -m backend {command}" in result.output
