"""`runtime/install.sh`, run for real in a scratch copy of the project with a fake Python on the
way: a failed venv creation leaves nothing behind, a venv whose interpreter changed is made again,
the interpreter's version is part of what decides a reinstall, and the llama-cpp-python build
shows that it is alive and keeps its log. (`--image` stops after those steps; no real pip, venv or
5-minute build runs here, and the real wheel cache is never touched.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.backend_harness import REPO

# The fake interpreter. Its behaviour comes from FAKE_* variables; every pip call it gets is
# appended to FAKE_CALLS. `-m venv DIR` copies it into DIR/bin/python (FAKE_VENV=fail: a venv
# without pip, then exit 1, as Debian's python3 without python3-venv does).
FAKE_PYTHON = f"""#!{sys.executable}
import os, pathlib, shutil, sys, time

args = sys.argv[1:]
here = pathlib.Path(sys.argv[0]).resolve()
version = os.environ.get("FAKE_VERSION", "3.11.4")
if args[:2] == ["-m", "venv"]:
    venv = pathlib.Path(args[2])
    (venv / "bin").mkdir(parents=True)
    shutil.copy(here, venv / "bin" / "python")
    (venv / "pyvenv.cfg").write_text(f"home = /fake\\nversion = {{version}}\\n")
    if os.environ.get("FAKE_VENV") == "fail":
        (venv / "NO_PIP").touch()
        print("Error: Command '-m ensurepip' returned non-zero exit status 1.", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if args[:1] == ["-c"]:
    code = args[1]
    if "%d.%d.%d" in code:
        print(version)
    elif "import pip" in code:
        sys.exit(1 if (here.parent.parent / "NO_PIP").exists() else 0)
    elif "import llama_cpp" in code:
        sys.exit(0 if os.environ.get("FAKE_LLAMA") == "installed" else 1)
    sys.exit(0)
if args[:1] == ["-"]:  # a script on stdin (install.sh's cached_wheel): run it, as python does
    sys.argv = args
    exec(compile(sys.stdin.read(), "<stdin>", "exec"))
    sys.exit(0)
if args[:2] == ["-m", "pip"]:
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        print(" ".join(args[2:]), file=calls)
    if "wheel" in args:
        print("CMAKE_ARGS=" + os.environ.get("CMAKE_ARGS", ""), flush=True)
        for percent in range(10, 60, 10):
            print(f"[ {{percent}}%] Building CXX object vendor/llama.cpp/ggml.cpp.o", flush=True)
            time.sleep(0.6)
        if os.environ.get("FAKE_BUILD") != "ok":
            print("CMake Error: no C++ compiler", flush=True)
            sys.exit(1)
        target = pathlib.Path(args[args.index("-w") + 1])
        (target / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").touch()
    sys.exit(0)
sys.exit(0)
"""


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A project root with only what `install.sh --image` reads, and the fake Python."""
    root = tmp_path / "project"
    (root / "runtime").mkdir(parents=True)
    shutil.copy(REPO / "runtime" / "install.sh", root / "runtime" / "install.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHON": str(fake),
        "FAKE_CALLS": str(tmp_path / "pip-calls"),
        "LLAMA_GATE_WHEEL_CACHE": str(tmp_path / "wheels"),
        "LLAMA_GATE_PROGRESS_SECONDS": "1",
        "FAKE_LLAMA": "installed",
    }
    return root, env


def _install(root: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "runtime" / "install.sh"), "--image"], env={**env, **extra},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _pip_calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def test_a_failed_venv_creation_leaves_nothing_behind(scratch: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch
    for _ in range(2):  # the second run fails the same clear way, not on a half-made venv
        failed = _install(root, env, FAKE_VENV="fail")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "could not create a venv" in failed.stderr
        assert "install python3-venv" in failed.stderr
        assert "ensurepip" in failed.stderr  # venv's own words, for what went wrong
        assert not (root / "runtime" / ".venv").exists()
    done = _install(root, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "runtime" / ".venv" / "bin" / "python").exists()


def test_a_half_made_venv_from_an_earlier_installer_is_made_again(
    scratch: tuple[Path, dict[str, str]],
) -> None:
    root, env = scratch
    assert _install(root, env, FAKE_VENV="fail").returncode == 1
    # What the earlier install.sh left: a venv whose python runs but has no pip.
    venv = root / "runtime" / ".venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(env["PYTHON"], venv / "bin" / "python")
    (venv / "pyvenv.cfg").write_text("version = 3.11.4\n")
    (venv / "NO_PIP").touch()
    done = _install(root, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runtime/.venv is not usable (it has no pip): making it again" in done.stdout
    assert not (venv / "NO_PIP").exists()


def test_a_venv_whose_interpreter_changed_is_made_again(
    scratch: tuple[Path, dict[str, str]],
) -> None:
    root, env = scratch
    assert _install(root, env).returncode == 0
    pyvenv = root / "runtime" / ".venv" / "pyvenv.cfg"
    pyvenv.write_text("version = 3.10.2\n")  # the interpreter it links to is now 3.11.4
    again = _install(root, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "it was made for Python 3.10.2, its interpreter is now 3.11.4" in again.stdout
    assert pyvenv.read_text().endswith("version = 3.11.4\n")


def test_the_interpreter_version_decides_a_reinstall(scratch: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch
    assert _install(root, env).returncode == 0
    installs = [
        call
        for call in _pip_calls(env)
        if call.startswith("--disable-pip-version-check install --quiet -e")
    ]
    assert len(installs) == 1
    stamp = root / "runtime" / ".venv" / ".llama-gate-installed"
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    assert stamp.read_text().split() == [digest, "3.11.4"]

    assert "Installing llama-gate" not in _install(root, env).stdout  # nothing changed

    # Same venv, same pyproject.toml, a patch release of the interpreter: install again.
    (root / "runtime" / ".venv" / "pyvenv.cfg").write_text("version = 3.11.9\n")
    newer = _install(root, env, FAKE_VERSION="3.11.9", PYTHON="")
    assert newer.returncode == 0, newer.stdout + newer.stderr
    assert "Installing llama-gate and its dependencies (Python 3.11.9)" in newer.stdout
    assert stamp.read_text().split() == [digest, "3.11.9"]


def test_the_llama_cpp_build_shows_progress_and_keeps_its_log(
    scratch: tuple[Path, dict[str, str]],
) -> None:
    root, env = scratch
    failed = _install(root, env, FAKE_LLAMA="missing")
    assert failed.returncode == 1
    assert "Building llama-cpp-python" in failed.stdout
    ticks = [line for line in failed.stdout.splitlines() if line.startswith("    ... ")]
    assert len(ticks) >= 2, failed.stdout
    assert "%] Building CXX object" in ticks[-1]  # the build's own progress, as it goes
    log = root / "runtime" / "logs" / "llama-cpp-build.log"
    assert "building llama-cpp-python failed (its log: runtime/logs/llama-cpp-build.log" in (
        failed.stderr
    )
    assert "CMake Error: no C++ compiler" in failed.stderr  # the log's end, shown at once
    text = log.read_text()
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in text
    assert "[ 50%] Building CXX object" in text
    assert not list(Path(env["LLAMA_GATE_WHEEL_CACHE"]).glob("*.whl"))

    built = _install(root, env, FAKE_LLAMA="missing", FAKE_BUILD="ok")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "cached in" in built.stdout
    wheels = list(Path(env["LLAMA_GATE_WHEEL_CACHE"]).glob("llama_cpp_python-*.whl"))
    assert len(wheels) == 1
    assert f"install --quiet {wheels[0]}[server]" in "\n".join(_pip_calls(env))


def test_a_cached_wheel_is_installed_without_a_build(scratch: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch
    cache = Path(env["LLAMA_GATE_WHEEL_CACHE"])
    cache.mkdir()
    (cache / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").touch()
    done = _install(root, env, FAKE_LLAMA="missing")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Building llama-cpp-python" not in done.stdout
    assert not any(" wheel " in f" {call} " for call in _pip_calls(env))


def test_a_cached_wheel_for_another_python_is_not_taken(
    scratch: tuple[Path, dict[str, str]],
) -> None:
    # A wheel copied in for another interpreter (an image's 3.12 beside this 3.11) cannot be
    # installed here: it is built anew, and the other stays.
    root, env = scratch
    cache = Path(env["LLAMA_GATE_WHEEL_CACHE"])
    cache.mkdir()
    other = cache / "llama_cpp_python-0.3.36-cp399-cp399-linux_x86_64.whl"
    other.touch()
    done = _install(root, env, FAKE_LLAMA="missing", FAKE_BUILD="ok")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Building llama-cpp-python" in done.stdout
    fits = cache / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    assert f"install --quiet {fits}[server]" in "\n".join(_pip_calls(env))
    assert other.exists()


def test_the_project_declares_an_spdx_license_so_setuptools_prints_no_banner() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    requires = project["build-system"]["requires"]
    assert requires == ["setuptools>=77"]  # the first to read a license expression
