#!/usr/bin/env bash
# xds-protos ships an old copy of the OpenTelemetry protos into the same package folder, and whichever
# installs last wins; the OTLP exporter needs opentelemetry-proto's own (InstrumentationScope). Puts it
# back where it lost. Used by scripts/bootstrap.sh and the image builds (deploy/docker/*.Dockerfile).
#   scripts/repair-otel-protos.sh PYTHON
set -euo pipefail
py=${1:-python}
check='from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope'
if ! "$py" -c "$check" 2>/dev/null; then
  version=$("$py" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
  "$py" -m pip install --quiet --progress-bar off --force-reinstall --no-deps "opentelemetry-proto==$version"
  "$py" -c "$check"
fi
