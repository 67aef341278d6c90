# llama-gate's one image: the proxy, the admin CLI, the migrations and the model server.
# docker-compose.yml picks the part with `command:`, the same entry points bin/console.sh starts.
#
# Built by the installer itself (`runtime/install.sh --image`), so llama-cpp-python is compiled
# portable (-DGGML_NATIVE=OFF) exactly as on a machine without Docker: a native build would carry
# the build host's CPU instructions into an image meant to run elsewhere. The image holds no secret,
# no settings file and no model: those come from the environment and mounts at run time.

# The base image: the official one by default; docker-compose.yml passes LLAMA_GATE_PYTHON_IMAGE
# here, so a machine without an image registry can build on a stand-in (tests/compose/standins.sh).
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
# Three mounts, none of which stays in the image:
# - a BuildKit cache for the llama-cpp-python wheel, so a second build does not compile it again;
# - runtime/ of the build context, for a wheel `runtime/install.sh` already built on this machine
#   (it keeps a copy in runtime/wheels/; used when it fits this image's Python and platform);
# - the secret `ca_bundle` (compose: LLAMA_GATE_CA_BUNDLE): a PEM file of extra certificate
#   authorities that pip must trust, for company networks whose proxy intercepts TLS. Empty: none.
RUN --mount=type=cache,id=llama-gate-wheels,target=/root/.cache/llama-gate/wheels \
    --mount=type=bind,source=runtime,target=/tmp/context-runtime \
    --mount=type=secret,id=ca_bundle,target=/run/secrets/ca_bundle \
    set -e; \
    cp /tmp/context-runtime/wheels/*.whl /root/.cache/llama-gate/wheels/ 2>/dev/null || true; \
    if grep -qs 'BEGIN CERTIFICATE' /run/secrets/ca_bundle; then \
      cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca_bundle > /tmp/trusted.pem 2>/dev/null \
        || cp /run/secrets/ca_bundle /tmp/trusted.pem; \
      export PIP_CERT=/tmp/trusted.pem SSL_CERT_FILE=/tmp/trusted.pem; \
    fi; \
    runtime/install.sh --image; \
    rm -f /tmp/trusted.pem

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
