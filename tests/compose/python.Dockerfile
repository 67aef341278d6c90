# Stands in for python:3.12-slim-bookworm where no image registry is reachable: Debian's python3
# (3.11, which llama-gate supports) with venv and pip, `python` on PATH like the official image.
ARG BASE=llama-gate-standin/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv python3-pip python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
