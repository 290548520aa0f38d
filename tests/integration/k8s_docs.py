"""The rendered Kubernetes manifests of every overlay, read as documents (tests/integration/test_k8s_*.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from deploy.k8s.render import render

ROOT = Path(__file__).resolve().parents[2]
Doc = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# Secrets the operator creates before applying, each with the command deploy/README.md gives for it.
OPERATOR_SECRETS = {"meshserve-admin": "kubectl -n meshserve create secret generic meshserve-admin"}


@cache
def docs(overlay: str) -> tuple[Doc, ...]:
    return tuple(d for d in yaml.safe_load_all(render(overlay)) if d)


def of_kind(overlay: str, *kinds: str) -> list[Doc]:
    return [d for d in docs(overlay) if d["kind"] in kinds]


def named(overlay: str, kind: str, name: str) -> Doc:
    [doc] = [d for d in of_kind(overlay, kind) if d["metadata"]["name"] == name]
    return doc


def pod_specs(overlay: str) -> list[tuple[Doc, Doc]]:
    return [(w, w["spec"]["template"]["spec"]) for w in of_kind(overlay, *WORKLOADS)]


def issued(overlay: str) -> dict[str, Doc]:
    """cert-manager's Certificates by the Secret each fills."""
    return {d["spec"]["secretName"]: d for d in of_kind(overlay, "Certificate")}


def env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def generated(overlay: str, prefix: str) -> str:
    """The hashed name kustomize gave a generated ConfigMap."""
    [name] = [d["metadata"]["name"] for d in of_kind(overlay, "ConfigMap") if d["metadata"]["name"].startswith(prefix)]
    return name
