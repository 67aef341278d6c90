"""Docker for the compose tests: the client with compose v2 and buildx, and a running engine.

`runtime/install.sh --dev` installs Debian's engine and debootstrap (root with apt-get) and, where
the machine's docker lacks them, Debian's compose v2 and buildx plugins into
runtime/docker/cli-plugins; `docker_env()` points DOCKER_CONFIG there when that is needed. An engine
that is installed but not running is started here (root only) and stopped again afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_DOCKER_CONFIG = ROOT / "runtime" / "docker"
ENGINE_LOG = ROOT / "runtime" / "logs" / "dockerd.log"
ENGINE_START_SECONDS = 60


def _works(argv: list[str], env: dict[str, str]) -> bool:
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def docker_env() -> dict[str, str]:
    """The environment in which `docker compose` and `docker buildx` work, if any does."""
    env = dict(os.environ)
    if shutil.which("docker") is None:
        return env
    plugins = ("compose", "buildx")
    if all(_works(["docker", p, "version"], env) for p in plugins):
        return env
    ours = {**env, "DOCKER_CONFIG": str(OUR_DOCKER_CONFIG)}
    if all(_works(["docker", p, "version"], ours) for p in plugins):
        return ours
    return env


def compose_argv(env: dict[str, str]) -> list[str] | None:
    """How to run compose v2: the docker plugin, or its binary alone (enough for `config`)."""
    if shutil.which("docker") and _works(["docker", "compose", "version"], env):
        return ["docker", "compose"]
    alone = OUR_DOCKER_CONFIG / "cli-plugins" / "docker-compose"
    if alone.is_file() and _works([str(alone), "version"], env):
        return [str(alone)]
    return None


def why_compose_is_missing() -> str:
    if os.geteuid() != 0:
        why = "not running as root"
    elif shutil.which("dpkg-deb") is None:
        why = "no dpkg-deb on this machine to unpack Debian's package"
    else:
        why = "fetching Debian's package failed; run runtime/install.sh --dev to see"
    return (
        "docker compose (v2) is not installed and runtime/install.sh --dev could not add it: " + why
    )


@contextmanager
def running_engine(env: dict[str, str]) -> Iterator[str | None]:
    """Yields None with an engine answering (started here if need be), else why there is none."""
    if shutil.which("docker") is None:
        yield "no docker client (runtime/install.sh --dev installs Debian's docker.io as root)"
        return
    if _works(["docker", "info"], env):
        yield None
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        yield "no Docker engine (runtime/install.sh --dev installs Debian's docker.io as root)"
        return
    if os.geteuid() != 0:
        yield "the Docker engine is not running, and only root can start it here"
        return
    ENGINE_LOG.parent.mkdir(parents=True, exist_ok=True)
    with ENGINE_LOG.open("ab") as log:
        engine = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ENGINE_START_SECONDS
        while not _works(["docker", "info"], env):
            if engine.poll() is not None or time.monotonic() > deadline:
                yield f"dockerd did not start (its log: {ENGINE_LOG.relative_to(ROOT)})"
                return
            time.sleep(1)
        yield None
    finally:
        engine.terminate()
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
