# The stateless services: auth, ratelimit, billing and router (the manifests pick the role with
# `command: python -m services.<role>`). No torch, no vLLM, no Envoy: the edge runs the official
# envoyproxy/envoy image with its generated config mounted, and inference has its own image.
#   docker build -f deploy/docker/services.Dockerfile -t meshserve-services:0.1.0 .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --system --gid 10001 meshserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin meshserve

COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
COPY deploy/__init__.py deploy/__init__.py
COPY deploy/envoy deploy/envoy
COPY scripts/repair-otel-protos.sh scripts/repair-otel-protos.sh

# Only the project's own dependencies (no extra), from the hashed lock (`make lock`), then the project
# itself: a test installs exactly this into a fresh virtual environment, checks it holds no torch or vllm and
# imports each role's __main__ from it.
COPY deploy/docker/services.lock deploy/docker/services.lock
RUN pip install --require-hashes -r deploy/docker/services.lock \
    && pip install --no-deps . \
    && scripts/repair-otel-protos.sh python

USER 10001:10001
EXPOSE 50051 9090
CMD ["python", "-m", "services.router"]
