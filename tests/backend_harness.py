"""The real model server for tests: `python -m backend serve` with SmolLM2, as a subprocess."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.db.localpg import free_port
from proxy.settings import KNOWN_VARIABLES

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = "SmolLM2-135M-Instruct.Q4_1"
START_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Backend:
    url: str
    key: str
    port: int

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def backend_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any llama-gate setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES | {"CONFIG_FILE"}}
    return {**env, "LLAMA_GATE_HOME": str(home), **settings}


def _health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 - ours
            body: dict[str, Any] = json.load(response)
            return body
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@contextmanager
def running_backend(home: Path, *aliases: str, **settings: str) -> Iterator[Backend]:
    """The real backend serving the real GGUF (plus `aliases` of it), until the block ends."""
    if not GGUF.is_file():
        pytest.fail(f"{GGUF} is missing: run runtime/install.sh")
    (home / "models").mkdir()
    (home / "models" / GGUF.name).symlink_to(GGUF)
    for alias in aliases:
        (home / "models" / f"{alias}.gguf").symlink_to(GGUF)
    port = free_port()
    key = secrets.token_urlsafe(24)
    env = backend_env(
        home,
        LLAMA_SERVER_PORT=str(port),
        LLAMA_SERVER_API_KEY=key,
        LLAMA_MODEL=DEFAULT,
        N_CTX="1024",
        N_THREADS="2",
        **settings,
    )
    log_path = home / "backend.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while _health(url) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"backend did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield Backend(url=url, key=key, port=port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert key not in log_path.read_text(), "the API key reached the log"
