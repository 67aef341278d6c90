# llama-gate's one image: the proxy, the admin CLI, the migrations and the model server.
# docker-compose.yml picks the part with `command:`, the same entry points bin/console.sh starts.
#
# Built by the installer itself (`runtime/install.sh --image`), so llama-cpp-python is compiled
# portable (-DGGML_NATIVE=OFF) exactly as on a machine without Docker: a native build would carry
# the build host's CPU instructions into an image meant to run elsewhere. The image holds no secret,
# no settings file and no model: those come from the environment and mounts at run time.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: compilers and cmake for llama-cpp-python; thrown away afterwards -----------------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Only what the installer and the package need; never .env nor runtime/config.env.
COPY pyproject.toml README.md alembic.ini ./
COPY proxy/ proxy/
COPY backend/ backend/
COPY runtime/install.sh runtime/install.sh
RUN runtime/install.sh --image

# --- run: the venv and the source, as an unprivileged user ------------------------------------------
FROM ${PYTHON_IMAGE}
# llama.cpp is built with OpenMP; the slim image lacks its runtime library.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin llama-gate
WORKDIR /app
# Same path as in the build stage: the venv's scripts and the editable install point at /app.
COPY --from=build /app /app
# runtime/ is where the backend writes its generated config and prompt cache and the proxy its
# audit spill files; created here so a fresh named volume mounted on audit-spill/ inherits the owner.
RUN mkdir -p /app/models /app/runtime/cache /app/runtime/audit-spill \
    && chown llama-gate:llama-gate /app/runtime /app/runtime/cache /app/runtime/audit-spill
ENV PATH=/app/runtime/.venv/bin:$PATH \
    LLAMA_GATE_HOME=/app \
    PYTHONUNBUFFERED=1
USER llama-gate
CMD ["llama-gate", "serve"]
