"""The rendered Kubernetes manifests of every overlay: the services wired to each other as the local mesh wires
them (tracing, rate-limit failure modes, keys, usage and prices)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.k8s.render import OVERLAYS
from services.billing.prices import Prices
from tests.integration.k8s_docs import (
    ROOT,
    env,
    generated,
    named,
    pod_specs,
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gpu_installs_trace_the_edge_and_every_service_to_one_collector(overlay: str) -> None:
    config = yaml.safe_load(named(overlay, "ConfigMap", generated(overlay, "envoy-config"))["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    services = [
        (w["metadata"]["name"], env(spec["containers"][0]))
        for w, spec in pod_specs(overlay)
        if w["kind"] != "Job" and w["metadata"]["labels"]["app.kubernetes.io/name"] not in ("edge", "redis")
    ]
    assert {name for name, _ in services} >= {"auth", "ratelimit", "billing", "router", "inference"}
    if overlay == "cpu-dev":
        assert "tracing" not in hcm and "otlp" not in clusters
        assert not any(k.startswith("OTEL_") for _, variables in services for k in variables)
        return
    [endpoint] = clusters["otlp"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    collector = f"{address['address']}:{address['port_value']}"
    assert collector == "otel-collector.observability:4317"
    assert hcm["tracing"]["random_sampling"]["value"] == 10
    for name, variables in services:
        assert variables["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"http://{collector}", name
        assert variables["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio", name
        assert float(variables["OTEL_TRACES_SAMPLER_ARG"]) == 0.1, name


def test_the_rate_limit_failure_modes_agree_across_edge_router_and_rules() -> None:
    from services.ratelimit.rules import FailureMode, Kind, Rules

    rules = Rules.from_yaml(ROOT / "deploy" / "local" / "ratelimits.yaml")
    shipped = yaml.safe_load(named("gpu", "ConfigMap", generated("gpu", "ratelimit-rules"))["data"]["ratelimits.yaml"])
    assert Rules.parse(shipped).failure_mode(Kind.TOKENS) is rules.failure_mode(Kind.TOKENS)
    config = yaml.safe_load(named("gpu", "ConfigMap", generated("gpu", "envoy-config"))["data"]["envoy.yaml"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ratelimit] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    assert ratelimit["typed_config"]["failure_mode_deny"] == (rules.failure_mode(Kind.REQUESTS) is FailureMode.CLOSED)
    # The router decides generation's limits under the very rules file the service reads (its failure modes
    # with it), on the service's Redis.
    deployment = named("gpu", "Deployment", "router")["spec"]["template"]["spec"]
    [router] = deployment["containers"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    [service] = named("gpu", "Deployment", "ratelimit")["spec"]["template"]["spec"]["containers"]
    service_env = {e["name"]: e.get("value") for e in service["env"]}
    assert env["MESHSERVE_ROUTER_LIMITS_REDIS_URL"] == service_env["MESHSERVE_RATELIMIT_REDIS_URL"]
    rules_path = Path(env["MESHSERVE_ROUTER_LIMITS_RULES"])
    [mount] = [m for m in router["volumeMounts"] if m["mountPath"] == str(rules_path.parent)]
    [volume] = [v for v in deployment["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"].startswith("ratelimit-rules")
    assert rules_path.name == Path(service_env["MESHSERVE_RATELIMIT_RULES"]).name
    assert "MESHSERVE_ROUTER_RATELIMIT" not in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_routers_check_generations_keys_on_auths_store_and_the_edge_skips_its_check_only_there(overlay: str) -> None:
    [router] = named(overlay, "Deployment", "router")["spec"]["template"]["spec"]["containers"]
    [auth] = named(overlay, "Deployment", "auth")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    assert (
        env["MESHSERVE_ROUTER_AUTH_REDIS_URL"]
        == {e["name"]: e.get("value") for e in auth["env"]}["MESHSERVE_AUTH_REDIS_URL"]
    )
    config = yaml.safe_load(named(overlay, "ConfigMap", generated(overlay, "envoy-config"))["data"]["envoy.yaml"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    skipped = [
        r["match"].get("path", "")
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
        if r.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {}).get("disabled")
    ]
    assert "/v1/chat/completions" in skipped and "/meshserve.llm.v2.LlmService/StreamChatCompletion" in skipped
    assert all(p.startswith(("/v1/", "/meshserve.llm.")) and "Model" not in p for p in skipped), skipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_routers_record_usage_to_billing_whose_ledger_and_prices_are_mounted(overlay: str) -> None:
    [router] = named(overlay, "Deployment", "router")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    host, _, port = env["MESHSERVE_ROUTER_BILLING"].partition(":")
    service = named(overlay, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert any(m["mountPath"] == env["MESHSERVE_ROUTER_USAGE_SPOOL"] for m in router["volumeMounts"])
    billing = named(overlay, "StatefulSet", "billing")
    [container] = billing["spec"]["template"]["spec"]["containers"]
    benv = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(benv["MESHSERVE_BILLING_LEDGER"]).parent == Path(mounts["ledger"])
    assert [t["metadata"]["name"] for t in billing["spec"]["volumeClaimTemplates"]] == ["ledger"]
    prices = yaml.safe_load(named(overlay, "ConfigMap", generated(overlay, "billing-prices"))["data"]["prices.yaml"])
    assert Prices.model_validate(prices) == Prices.from_yaml(ROOT / "deploy" / "local" / "prices.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spend_budgets_are_priced_with_billings_table_where_they_are_decided(overlay: str) -> None:
    for kind, name, variable in (
        ("Deployment", "router", "MESHSERVE_ROUTER_LIMITS_PRICES"),
        ("Deployment", "ratelimit", "MESHSERVE_RATELIMIT_PRICES"),
    ):
        spec = named(overlay, kind, name)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        path = Path(env(container)[variable])
        [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        table = named(overlay, "ConfigMap", volume["configMap"]["name"])["data"][path.name]
        assert Prices.model_validate(yaml.safe_load(table)) == Prices.from_yaml(
            ROOT / "deploy" / "local" / "prices.yaml"
        )
