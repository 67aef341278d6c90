"""Run the backend: take the port first, then load the model, then hand both to uvicorn."""

from __future__ import annotations

import errno
import logging
import os
import socket

import uvicorn

from backend.app import create_backend_app
from backend.config import BackendPlan, check_api_key, load_config, write_config
from backend.errors import BackendError
from proxy.settings import Settings

logger = logging.getLogger(__name__)

# Long enough for a stream's last tokens, short enough for `docker stop`'s 10 s before SIGKILL.
GRACEFUL_SHUTDOWN_SECONDS = 5


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet), or `BackendError` saying why not.

    Binding before the model loads makes a taken port fail at once and leaves no window in which
    another process could take it between a check and the real bind.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise BackendError(f"LLAMA_SERVER_HOST={host} cannot be resolved: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restart right after a stop must not wait out TIME_WAIT. An address that
    # something still listens on stays refused.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BackendError(
                f"port {port} on {host} is already in use (is a backend already running?); stop "
                f"that process or set another LLAMA_SERVER_PORT"
            ) from None
        raise BackendError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve(settings: Settings, plan: BackendPlan) -> None:
    """Write the config, bind, load the default model and serve until SIGINT/SIGTERM."""
    check_api_key(settings)
    path = write_config(settings, plan.config)
    server_settings, model_settings = load_config(path, settings.server_api_key.reveal())
    sock = bind(settings.server_host, settings.server_port)
    try:
        if os.environ.pop("CONFIG_FILE", None) is not None:
            # llama_cpp.server's create_app would load that file instead of these settings.
            logger.warning("ignoring CONFIG_FILE: the backend runs %s", path)
        logger.info("loading model %s from %s", plan.default.alias, plan.default.path)
        try:
            app = create_backend_app(server_settings, model_settings, plan.cache)
        except (ValueError, OSError) as exc:
            raise BackendError(f"cannot load model {plan.default.alias}: {exc}") from None
        logger.info(
            "serving %d model(s) on http://%s:%d (default %s, config %s, %s)",
            len(model_settings),
            settings.server_host,
            settings.server_port,
            plan.default.alias,
            path,
            plan.cache.describe(),
        )
        config = uvicorn.Config(
            app,
            log_level="info",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
