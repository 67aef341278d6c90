"""The model files: every `models/*.gguf` is a model whose alias is the file's stem."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.errors import BackendError

SUFFIX = ".gguf"


@dataclass(frozen=True)
class ModelFile:
    alias: str
    path: Path
    size: int


def models_dir(home: Path) -> Path:
    return home / "models"


def find_models(directory: Path) -> list[ModelFile]:
    """Every readable `*.gguf` in `directory`, sorted by alias; a symlink counts as its target."""
    found: list[ModelFile] = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            stat = path.stat()  # follows symlinks: a dangling one is skipped, not served
        except OSError:
            continue
        if path.is_file():
            found.append(ModelFile(alias=path.stem, path=path.absolute(), size=stat.st_size))
    return found


def require_models(directory: Path) -> list[ModelFile]:
    """Like `find_models`, but having none is an error that says how to get one."""
    models = find_models(directory)
    if not models:
        raise BackendError(
            f"no model: {directory} has no *{SUFFIX} file; run runtime/install.sh to fetch the "
            f"small default model, or copy a GGUF file there"
        )
    return models


def pick_default(models: Sequence[ModelFile], wanted: str, directory: Path) -> ModelFile:
    """The model LLAMA_MODEL names (alias or file name), or the first one when it is empty."""
    if not wanted:
        return models[0]
    alias = wanted.removesuffix(SUFFIX)
    for model in models:
        if model.alias == alias:
            return model
    names = ", ".join(model.alias for model in models)
    raise BackendError(
        f"LLAMA_MODEL={wanted!r} is not a model in {directory}; the models there are: {names}"
    )
