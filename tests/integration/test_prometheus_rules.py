"""The shipped Prometheus rules: valid for promtool, and the billing drift rules behave on sample series."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: scripts/bootstrap.sh installs Debian's prometheus package")
    return subprocess.run([exe, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_fires_on_unbilled_tokens_and_only_then() -> None:
    result = promtool("test", "rules", "rules_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_ships_the_same_rules_and_dashboard() -> None:
    from tests.integration.k8s_docs import generated, named

    shipped = named("gpu", "ConfigMap", generated("gpu", "prometheus-rules"))["data"]["meshserve.rules.yaml"]
    assert shipped == (RULES / "rules.yaml").read_text()
    dashboard = named("gpu", "ConfigMap", generated("gpu", "grafana-dashboard-meshserve"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["meshserve.json"] == (RULES.parent / "grafana" / "meshserve.json").read_text()


def test_prometheus_operator_scrapes_every_service_and_loads_the_same_rules() -> None:
    from tests.integration.k8s_docs import of_kind, pod_specs

    [rule] = of_kind("gpu", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((RULES / "rules.yaml").read_text())["groups"]
    # Every Service with a metrics port has a ServiceMonitor that selects it, on that port.
    monitors = of_kind("gpu", "ServiceMonitor")
    for service in of_kind("gpu", "Service"):
        if "metrics" not in [p["name"] for p in service["spec"]["ports"]]:
            continue
        labels = service["metadata"]["labels"]
        [monitor] = [m for m in monitors if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The edge's Envoy is scraped on its admin port, which no Service exposes.
    [pod_monitor] = of_kind("gpu", "PodMonitor")
    [edge] = [spec for w, spec in pod_specs("gpu") if w["metadata"]["name"] == "edge"]
    ports = {p["name"]: p["containerPort"] for p in edge["containers"][0]["ports"]}
    assert [(e["port"], e["path"]) for e in pod_monitor["spec"]["podMetricsEndpoints"]] == [
        ("admin", "/stats/prometheus")
    ]
    assert ports["admin"] == 9901
    # Overlays without prometheus-operator carry none of its kinds.
    assert not of_kind("cpu-dev", "ServiceMonitor", "PodMonitor", "PrometheusRule")


def test_the_dashboard_is_grafana_json_whose_recorded_series_the_rules_define() -> None:
    dashboard = json.loads((RULES.parent / "grafana" / "meshserve.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    recorded = set(re.findall(r"^\s+- record: (\S+)", (RULES / "rules.yaml").read_text(), re.M))
    queries = []
    for p in dashboard["panels"]:
        assert p["type"] == "timeseries" and p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert set(re.findall(r"\b(meshserve:[a-z0-9_:]+)", t["expr"])) <= recorded, t["expr"]
            queries.append(t["expr"])
    # Every query is valid PromQL: promtool parses each one as a recording rule.
    as_rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(as_rules, f)
        f.flush()
        result = promtool("check", "rules", f.name)
    assert result.returncode == 0, result.stdout + result.stderr
