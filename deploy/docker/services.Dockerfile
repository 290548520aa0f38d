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

# Only the project's own dependencies (no extra): a test checks they hold no torch or vllm and cover what
# each role's __main__ imports. DL3013: the one unpinned install is this project itself.
# hadolint ignore=DL3013
RUN pip install . && scripts/repair-otel-protos.sh python

USER 10001:10001
EXPOSE 50051 9090
CMD ["python", "-m", "services.router"]
