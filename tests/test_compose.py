"""docker-compose.yml, the Dockerfile and .env.example, checked without running them.

`docker compose config` (compose v2; `runtime/install.sh --dev` fetches Debian's build where the
machine lacks it) validates the file and interpolates .env.example into it as `docker compose up`
would; the tests read what it resolved. tests/test_compose_up.py builds and runs the stack.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from backend.models import models_dir
from proxy.app import AUDIT_FLUSH_SECONDS
from proxy.cli import serve as cli_serve
from proxy.settings import DEFAULTS, KNOWN_VARIABLES, SECRET_VARIABLES
from tests.docker_helpers import compose_argv, docker_env, why_compose_is_missing

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "runtime" / "install.sh"
SCRIPTS = (ROOT / "bin" / "console.sh", INSTALL)

# Compose's own variables, for building and choosing images: no container is given them.
BUILD_VARIABLES = {
    "LLAMA_GATE_PYTHON_IMAGE": "python:3.12-slim-bookworm",
    "LLAMA_GATE_POSTGRES_IMAGE": "postgres:17",
    "LLAMA_GATE_IMAGE": "llama-gate:local",
    "LLAMA_GATE_CA_BUNDLE": "./deploy/no-extra-ca.pem",
}
OUR_SERVICES = ("models", "migrate", "backend", "proxy")  # the ones that run llama-gate's code
POSTGRES_IMAGE_VARIABLES = frozenset({"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"})
COMPOSE_SECRETS = ("POSTGRES_AUTH_PASSWORD", "LLAMA_SERVER_API_KEY")
TEST_SECRETS = {
    "POSTGRES_AUTH_PASSWORD": "pg-secret-for-tests",
    "LLAMA_SERVER_API_KEY": "key-4-tests",
}
# Settings compose passes to no container, and why.
NOT_PASSED = {
    "POSTGRES_AUTH_DSN": "compose builds the connection from POSTGRES_AUTH_* for its own Postgres",
    "LLAMA_PROXY_ENABLED": "compose always runs the proxy",
    "LLAMA_GATE_HOME": "the image sets it",
    "LLAMA_GATE_LOCAL_POSTGRES": "only console.sh runs a local Postgres",
}
# Which scripted command each service runs, told apart by a word only that command has.
SERVICE_ROLES = {
    "migrate": "init-db",
    "models": "fetch-fallback",
    "backend": "backend serve",
    "proxy": "llama-gate serve",
}


def _compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run compose on the file with .env.example, isolated from the caller's settings."""
    docker = docker_env()
    argv = compose_argv(docker)
    if argv is None:
        pytest.skip(why_compose_is_missing())
    clean = {
        key: value
        for key, value in docker.items()
        if key not in KNOWN_VARIABLES
        and key not in POSTGRES_IMAGE_VARIABLES
        and key not in BUILD_VARIABLES
        and (key == "DOCKER_CONFIG" or not key.startswith(("COMPOSE_", "DOCKER_")))
    }
    return subprocess.run(
        [*argv, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _resolved(**env: str) -> dict[str, Any]:
    result = _compose("config", **{**TEST_SECRETS, **env})
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The services as compose resolves them with .env.example and the test secrets."""
    resolved: dict[str, dict[str, Any]] = _resolved()["services"]
    return resolved


def _seconds(duration: str) -> float:
    """A compose duration such as `1m30s` or `60s`, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Target -> (source, read-only), from the short or the long volume syntax."""
    found: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, "ro" in ",".join(mode).split(","))
        else:
            found[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only")))
    return found


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(published, target) port pairs, from the short or the long syntax."""
    pairs = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.append((str(port.get("published", "")), str(port["target"])))
        else:
            published, _, target = str(port).rpartition(":")
            pairs.append((published.rpartition(":")[2], target))
    return pairs


def _script_entry_points() -> set[tuple[str, ...]]:
    """Every `"$PROGRAM" words...` the scripts run, the program reduced to its file name."""
    found: set[tuple[str, ...]] = set()
    call = re.compile(r'"\$([A-Z_]+)(/[^"\s]*)?"((?:[ \t]+-?[a-z][a-z-]*)+)')
    for script in SCRIPTS:
        text = script.read_text(encoding="utf-8")
        assignments = dict(re.findall(r'^([A-Z_]+)="([^"]*)"', text, re.MULTILINE))
        for variable, rest, words in call.findall(text):
            program = rest or assignments.get(variable, "")
            found.add((PurePosixPath(program).name, *words.split()))
    return found


def _scripted(role: str) -> list[str]:
    matches = [c for c in _script_entry_points() if role in " ".join(c)]
    assert len(matches) == 1, f"{role!r} should be one command in the scripts: {matches}"
    return list(matches[0])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile_instructions():
        if word == "ENV":
            env.update(re.findall(r"([A-Z_]+)=(\S+)", rest))
    return env


def _env_example() -> dict[str, tuple[str, bool, str]]:
    """Variable -> (value, commented out, the comment line above it)."""
    found: dict[str, tuple[str, bool, str]] = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            commented, name, value = match.groups()
            assert name not in found, f"{name} appears twice in .env.example"
            found[name] = (value, commented is not None, previous)
        previous = line
    return found


# --- the file as compose sees it ------------------------------------------------------------------


def test_compose_accepts_the_file_with_env_example_and_its_secrets_set() -> None:
    result = _compose("config", "-q", **TEST_SECRETS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", COMPOSE_SECRETS)
def test_an_unset_secret_stops_compose_with_a_message_naming_it(secret: str) -> None:
    # .env.example leaves both empty on purpose: a copy must be filled in before anything starts.
    others = {name: value for name, value in TEST_SECRETS.items() if name != secret}
    result = _compose("config", "-q", **others)
    assert result.returncode != 0
    assert f"{secret} is not set - copy .env.example to .env" in result.stderr


def test_only_the_proxy_is_published(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    assert "ports" not in services["backend"]


def test_the_proxy_is_published_on_llama_proxy_port_and_listens_there() -> None:
    default = DEFAULTS["LLAMA_PROXY_PORT"]
    for port in (default, "9011"):
        proxy = _resolved(LLAMA_PROXY_PORT=port)["services"]["proxy"]
        assert _published(proxy) == [(port, port)]
        assert proxy["environment"]["LLAMA_PROXY_PORT"] == port
        assert proxy["environment"]["LLAMA_PROXY_HOST"] == "0.0.0.0"  # noqa: S104 - in its container


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def waits(service: str) -> dict[str, str]:
        return {name: spec["condition"] for name, spec in services[service]["depends_on"].items()}

    assert waits("proxy") == {
        "migrate": "service_completed_successfully",
        "backend": "service_healthy",
    }
    assert waits("migrate") == {"postgres": "service_healthy"}
    assert waits("backend") == {"models": "service_completed_successfully"}
    assert "depends_on" not in services["models"]
    for one_shot in ("migrate", "models"):
        assert services[one_shot]["restart"] == "no"


def test_the_image_is_built_once_with_the_ca_secret_and_never_pulled(
    services: dict[str, dict[str, Any]],
) -> None:
    assert {services[name]["image"] for name in OUR_SERVICES} == {
        BUILD_VARIABLES["LLAMA_GATE_IMAGE"]
    }
    builders = [name for name in OUR_SERVICES if "build" in services[name]]
    assert builders == ["migrate"]  # once per service would build it four times at once
    assert services["migrate"]["pull_policy"] == "build"
    assert all(services[n]["pull_policy"] == "never" for n in OUR_SERVICES if n != "migrate")
    build = services["migrate"]["build"]
    assert build["args"] == {"PYTHON_IMAGE": BUILD_VARIABLES["LLAMA_GATE_PYTHON_IMAGE"]}
    assert [secret["source"] for secret in build["secrets"]] == ["ca_bundle"]
    bundle = Path(_resolved()["secrets"]["ca_bundle"]["file"])
    assert bundle == ROOT / "deploy" / "no-extra-ca.pem"
    assert "BEGIN CERTIFICATE" not in bundle.read_text(encoding="utf-8")
    given = _resolved(LLAMA_GATE_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")["secrets"]
    assert given["ca_bundle"]["file"] == "/etc/ssl/certs/ca-certificates.crt"


def test_models_are_read_only_for_the_backend_and_written_only_by_the_init_service(
    services: dict[str, dict[str, Any]],
) -> None:
    target = str(models_dir(Path(_image_env()["LLAMA_GATE_HOME"])))
    host_models = str(ROOT / "models")
    assert _mounts(services["backend"])[target] == (host_models, True)
    assert _mounts(services["models"])[target] == (host_models, False)
    assert all(target not in _mounts(services[name]) for name in ("migrate", "proxy"))


def test_the_proxy_keeps_audit_spill_files_in_a_named_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    # proxy/app.py spills to <runtime>/audit-spill; the image's runtime is LLAMA_GATE_HOME/runtime.
    target = f"{_image_env()['LLAMA_GATE_HOME']}/runtime/audit-spill"
    source, read_only = _mounts(services["proxy"])[target]
    assert not read_only
    assert "/" not in source  # a named volume, not a bind mount
    assert source in _resolved()["volumes"]


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    ports = {"backend": DEFAULTS["LLAMA_SERVER_PORT"], "proxy": DEFAULTS["LLAMA_PROXY_PORT"]}
    for name, port in ports.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]  # no curl in a slim image
        assert f"http://127.0.0.1:{port}/health" in test[3]


def test_the_proxy_may_finish_its_requests_and_audit_flush_before_being_killed(
    services: dict[str, dict[str, Any]],
) -> None:
    grace = _seconds(services["proxy"]["stop_grace_period"])
    # Requests drain first, then the last audit rows go to Postgres (or to disk after the flush).
    assert grace > cli_serve.SHUTDOWN_SECONDS + AUDIT_FLUSH_SECONDS


def test_every_variable_given_to_our_services_is_a_known_setting(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in OUR_SERVICES:
        unknown = set(services[name].get("environment", {})) - KNOWN_VARIABLES
        assert not unknown, f"{name} is given variables the settings do not know: {unknown}"
    assert set(services["postgres"]["environment"]) <= POSTGRES_IMAGE_VARIABLES


def test_every_setting_reaches_a_container_unless_compose_has_no_use_for_it(
    services: dict[str, dict[str, Any]],
) -> None:
    passed = set().union(*(services[name].get("environment", {}) for name in OUR_SERVICES))
    missing = KNOWN_VARIABLES - passed - set(NOT_PASSED)
    assert not missing, f"docker-compose.yml passes these settings to no service: {missing}"


def test_compose_defaults_are_the_settings_defaults() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    defaults = re.findall(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}", text)
    assert defaults
    for name, default in defaults:
        expected = BUILD_VARIABLES[name] if name in BUILD_VARIABLES else DEFAULTS[name]
        assert default == expected, f"{name}: compose says {default!r}"
    assert set(BUILD_VARIABLES) <= {name for name, _ in defaults}


def test_no_secret_has_a_value_in_the_compose_file(services: dict[str, dict[str, Any]]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    secrets = SECRET_VARIABLES | {"POSTGRES_PASSWORD"}
    seen = 0
    for name, service in raw.items():
        for variable, value in service.get("environment", {}).items():
            if variable in secrets:
                seen += 1
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, variable)
                expected = TEST_SECRETS[re.findall(r"[A-Z_]+", str(value))[0]]
                assert services[name]["environment"][variable] == expected
    assert seen >= 4  # postgres, migrate and proxy's password; backend and proxy's key


# --- the same entry points as bin/console.sh ------------------------------------------------------


def test_each_service_runs_the_command_the_scripts_run(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, role in SERVICE_ROLES.items():
        assert services[name]["command"] == _scripted(role), name


def test_the_image_is_built_by_install_sh_portable_and_runs_the_proxy_by_default() -> None:
    instructions = _dockerfile_instructions()
    builds = [args for word, args in instructions if word == "RUN" and "install.sh --image" in args]
    assert len(builds) == 1
    # The wheel cache survives builds; the CA bundle is a secret, mounted for this step alone.
    assert "--mount=type=cache," in builds[0]
    assert "--mount=type=secret,id=ca_bundle," in builds[0]
    assert "runtime/install.sh --image;" in builds[0]
    install = INSTALL.read_text(encoding="utf-8")
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in install
    # --image stops before config.env (which holds the backend key), the model and Postgres.
    image_exit = install.index('if [ "$IMAGE" = 1 ]; then')
    assert install.index("CMAKE_ARGS=") < image_exit < install.index('touch "$CONFIG"')
    cmd = [args for word, args in instructions if word == "CMD"]
    assert [yaml.safe_load(c) for c in cmd][-1] == _scripted(SERVICE_ROLES["proxy"])
    users = [args for word, args in instructions if word == "USER"]
    assert users, "the image must not run as root"
    assert users[-1] not in {"root", "0"}
    assert _image_env()["PATH"].startswith(f"{_image_env()['LLAMA_GATE_HOME']}/runtime/.venv/bin:")


def test_the_image_never_receives_a_secret() -> None:
    for word, args in _dockerfile_instructions():
        if word in {"COPY", "ADD"}:
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            if "--from=build" in args:
                continue
            for source in sources:
                assert source not in {".", "./", "runtime/", "runtime"}, args
                assert not source.startswith(".env"), args
                assert source != "runtime/config.env", args
        assert word != "ARG" or not re.search(r"KEY|PASSWORD|SECRET", args), args
        assert word != "ENV" or not any(s in args for s in SECRET_VARIABLES), args
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert {".env", "runtime/*", "models/*", ".git"} <= set(ignored)


# --- .env.example ---------------------------------------------------------------------------------


def test_env_example_documents_every_setting_with_its_default() -> None:
    documented = _env_example()
    assert set(documented) == KNOWN_VARIABLES | set(BUILD_VARIABLES), "documented vs known"
    for name, (value, _, explanation) in documented.items():
        assert re.fullmatch(r"# [A-Z0-9].{10,}", explanation), f"{name} has no explanation above it"
        if name in DEFAULTS:
            assert value == DEFAULTS[name], f"{name}={value!r} but Settings uses {DEFAULTS[name]!r}"
        if name in BUILD_VARIABLES:
            assert value == BUILD_VARIABLES[name], f"{name}={value!r} but compose uses another"


def test_env_example_sets_only_the_empty_secrets() -> None:
    # Everything else is commented out, so a copied .env changes no default, e.g. it does not tell
    # install.sh that a database is configured and so skip the local one.
    active = {
        name: value for name, (value, commented, _) in _env_example().items() if not commented
    }
    assert active == dict.fromkeys(COMPOSE_SECRETS, "")
