"""Settings -> llama_cpp.server's config file (`runtime/backend-config.json`) and back.

The file is the whole truth about what `serve` runs, except the API key: that stays in memory so it
never sits in a file nobody needs to read, nor in argv where `ps` shows it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import (
    LlamaChatCompletionHandlerNotFoundException,
    get_chat_completion_handler,
)
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings
from pydantic import ValidationError

from backend.cache_plan import CachePlan, plan_cache
from backend.errors import BackendError
from backend.models import ModelFile, models_dir, pick_default, require_models
from proxy.settings import Settings

CONFIG_NAME = "backend-config.json"

# llama_cpp.server field -> the variable a user sets, so a rejected value is named as they know it.
_VARIABLES = {
    "host": "LLAMA_SERVER_HOST",
    "port": "LLAMA_SERVER_PORT",
    "n_ctx": "N_CTX",
    "n_threads": "N_THREADS",
    "n_gpu_layers": "N_GPU_LAYERS",
    "chat_format": "LLAMA_CHAT_FORMAT",
}


@dataclass(frozen=True)
class BackendPlan:
    """What `serve` will run: the models, the default one, llama_cpp.server's config, and the
    prompt cache the backend puts on the model."""

    models: list[ModelFile]
    default: ModelFile
    config: dict[str, Any]
    cache: CachePlan


def config_path(settings: Settings) -> Path:
    return settings.runtime_dir / CONFIG_NAME


def cache_dir(settings: Settings) -> Path:
    """Where the prompt cache keeps its states when LLAMA_PROMPT_CACHE=disk (emptied at start)."""
    return settings.runtime_dir / "cache" / "prompt-states"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def check_host(settings: Settings) -> None:
    if settings.server_allow_remote or is_loopback(settings.server_host):
        return
    raise BackendError(
        f"LLAMA_SERVER_HOST={settings.server_host} is not a loopback address, so machines other "
        f"than this one could reach the model; use 127.0.0.1, or set LLAMA_SERVER_ALLOW_REMOTE=1 "
        f"when that is intended (docker compose)"
    )


def check_api_key(settings: Settings) -> None:
    if not settings.server_api_key:
        raise BackendError(
            "LLAMA_SERVER_API_KEY is empty, and without it anyone who reaches the port may use the "
            "model; run runtime/install.sh (it writes one to runtime/config.env) or set it"
        )


def _threads(n_threads: int) -> int:
    # 0 means "llama.cpp's choice". It must still be written out: llama_cpp.server's settings read
    # the environment for any field left unset, and N_THREADS=0 there fails its own check (>= 1).
    return n_threads if n_threads else max((os.cpu_count() or 2) // 2, 1)


def _check_chat_format(name: str) -> None:
    if not name or name.startswith("chat_template."):  # a template stored in the GGUF
        return
    try:
        get_chat_completion_handler(name)
    except LlamaChatCompletionHandlerNotFoundException:
        raise BackendError(
            f"LLAMA_CHAT_FORMAT={name!r} is not a chat format llama_cpp knows; leave it empty to "
            f"use the template stored in the model, or use a name such as chatml or llama-2"
        ) from None


def model_entry(settings: Settings, model: ModelFile) -> dict[str, Any]:
    return {
        "model": str(model.path),
        "model_alias": model.alias,
        "n_ctx": settings.n_ctx,
        "n_threads": _threads(settings.n_threads),
        "n_gpu_layers": settings.n_gpu_layers,
        "chat_format": settings.chat_format or None,
        # The backend installs its own prompt cache (backend.cache_plan); llama_cpp.server's
        # would stand in its way.
        "cache": False,
        # Logits for every token (what logprobs need) would be copied into every cached state,
        # a vocabulary-sized row per token: several times the model's own state.
        "logits_all": settings.prompt_cache == "off",
        "verbose": False,  # llama.cpp's per-request timings would drown the server's own log
    }


def plan(settings: Settings) -> BackendPlan:
    """Check every backend setting and build the config; raise `BackendError` on the first fault."""
    check_host(settings)
    directory = models_dir(settings.home)
    models = require_models(directory)
    default = pick_default(models, settings.model, directory)
    _check_chat_format(settings.chat_format)
    # llama_cpp.server serves the first model when a request names none, so the default leads.
    ordered = [default, *(model for model in models if model != default)]
    config: dict[str, Any] = {
        "host": settings.server_host,
        "port": settings.server_port,
        # Its default (True) ends a running stream with a normal-looking [DONE] as soon as another
        # request waits: with many users every long answer would be cut short.
        "interrupt_requests": False,
        "models": [model_entry(settings, model) for model in ordered],
    }
    _validate(config)
    cache = plan_cache(
        settings.prompt_cache,
        settings.prompt_cache_bytes,
        max(model.size for model in models),
        cache_dir(settings),
    )
    return BackendPlan(models=models, default=default, config=config, cache=cache)


def write_config(settings: Settings, config: dict[str, Any]) -> Path:
    """Write the config atomically, so a starting server never reads half a file."""
    path = config_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def load_config(path: Path, api_key: str) -> tuple[ServerSettings, list[ModelSettings]]:
    """llama_cpp.server's settings from the written file, plus the key kept out of it."""
    try:
        file_settings = ConfigFileSettings.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise BackendError(
            f"{path} is not a valid llama_cpp.server config: {_first(exc)}"
        ) from None
    server = file_settings.model_dump(exclude={"models"})
    return ServerSettings.model_validate({**server, "api_key": api_key}), file_settings.models


def _validate(config: dict[str, Any]) -> None:
    try:
        ConfigFileSettings.model_validate(config)
    except ValidationError as exc:
        raise BackendError(_first(exc)) from None


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = next((str(part) for part in reversed(error["loc"]) if isinstance(part, str)), "")
    name = _VARIABLES.get(field, field)
    value = error.get("input")
    return f"{name}={value!r}: {error['msg'].lower()}"
