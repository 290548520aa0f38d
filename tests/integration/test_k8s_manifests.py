"""The rendered Kubernetes manifests of every overlay: schema-valid, secure, and each workload reachable, mounted
and scaled as its services need (how the services are wired to each other: test_k8s_wiring.py)."""

from __future__ import annotations

import subprocess

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.cert_manager import v1 as cert_manager
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

from deploy.k8s.render import OVERLAYS, stale_files
from services.auth.keys import SECRET_PREFIX
from services.inference.metrics import METRICS, QUEUE_DEPTH
from services.router.admission import QUEUE_DEPTH as ROUTER_QUEUE_DEPTH
from tests.integration.k8s_docs import (
    OPERATOR_SECRETS,
    ROOT,
    docs,
    env,
    generated,
    issued,
    named,
    of_kind,
    pod_specs,
)


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["canary", "cpu-dev", "gpu", "gpu-spot"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    for doc in docs(overlay):
        # cert-manager's and prometheus-operator's own schemas (their CRDs as pydantic models); a field one
        # does not know would be dropped on the way through, so the round trip must give the document back.
        crds = {"cert-manager.io/": cert_manager, "monitoring.coreos.com/": prometheus_operator}
        models = [m for group, m in crds.items() if doc["apiVersion"].startswith(group)]
        if models:
            model = getattr(models[0], doc["kind"]).model_validate(doc)
            assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
            continue
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_and_bounded(overlay: str) -> None:
    for workload, spec in pod_specs(overlay):
        pod_sc = spec.get("securityContext", {})
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{overlay}/{workload['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), f"{where} {bound}"
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{where}: duplicate env {names}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_probes_and_grpc_services_use_native_grpc_probes(overlay: str) -> None:
    for workload in of_kind(overlay, "Deployment", "StatefulSet"):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{overlay}/{workload['metadata']['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, where
            if any(p.get("name") == "grpc" for p in c.get("ports", [])):
                # The plaintext health-only port: the kubelet cannot present a mesh certificate.
                health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
                assert any(k.endswith("_HEALTH_PORT") and v == str(health) for k, v in env(c).items()), where
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe not in c or c[probe]["grpc"]["port"] == health, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_start_up_fits_model_loading_and_shutdown_fits_streams(overlay: str) -> None:
    for d in of_kind(overlay, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/name"] not in ("inference", "router"):
            continue
        spec = d["spec"]["template"]["spec"]
        main = spec["containers"][0]
        e = env(main)
        prefix = "MESHSERVE_INFERENCE_" if "inference" in d["metadata"]["name"] else "MESHSERVE_ROUTER_"
        assert spec["terminationGracePeriodSeconds"] > int(e[prefix + "GRACE_SECONDS"]) + int(
            e[prefix + "DRAIN_SECONDS"]
        )
        if prefix == "MESHSERVE_INFERENCE_":
            startup = main["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
            assert e["MESHSERVE_INFERENCE_MODEL_STORE"] == "/models"
            # The init container waits for the very model the engine will load.
            assert env(spec["initContainers"][0])["MODEL"] == e["MESHSERVE_INFERENCE_MODEL"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "model-store"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_pods_that_exist(overlay: str) -> None:
    templates = [w["spec"]["template"]["metadata"]["labels"] for w in of_kind(overlay, "Deployment", "StatefulSet")]
    for service in of_kind(overlay, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port.get("name"), service["metadata"]["name"]
    for pdb in of_kind(overlay, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in templates), pdb["metadata"]["name"]


def test_the_committed_generated_inputs_are_current() -> None:
    # kustomize builds every overlay from git with no render step, so what the overlays read must be current.
    stale = stale_files()
    assert stale == [], f"deploy/k8s generated inputs are stale, run `make gen`: {stale}"


def test_no_credential_is_in_the_tree_and_the_operator_is_told_how_to_create_it() -> None:
    for overlay in OVERLAYS:
        assert not [d for d in of_kind(overlay, "Secret") if d["metadata"]["name"] in OPERATOR_SECRETS]
    guide = (ROOT / "deploy" / "README.md").read_text()
    assert all(command in guide for command in OPERATOR_SECRETS.values())
    # The documented secret is one the auth service accepts (meshserve's key prefix).
    assert f'BOOTSTRAP_ADMIN_SECRET="{SECRET_PREFIX}$(openssl rand -hex 32)"' in guide
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "admin.env" not in tracked.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_configmap_and_secret_exists(overlay: str) -> None:
    have = {(d["kind"], d["metadata"]["name"]) for d in docs(overlay)}
    for workload, spec in pod_specs(overlay):
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in have
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in have or v["secret"]["secretName"] in issued(overlay)
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in have
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if key in ref and not ref[key].get("optional") and ref[key]["name"] not in OPERATOR_SECRETS:
                        assert (kind, ref[key]["name"]) in have, f"{workload['metadata']['name']}: {ref}"
        assert ("ServiceAccount", spec["serviceAccountName"]) in have


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_inference_hpa_scales_on_queue_metrics_the_router_and_the_engines_export(overlay: str) -> None:
    hpa = named(overlay, "HorizontalPodAutoscaler", "inference")
    router_queue, engine_queue = hpa["spec"]["metrics"]
    assert engine_queue["type"] == "Pods" and engine_queue["pods"]["metric"]["name"] == QUEUE_DEPTH
    assert QUEUE_DEPTH in METRICS
    assert router_queue["type"] == "External"
    assert router_queue["external"]["metric"]["name"] == ROUTER_QUEUE_DEPTH._name
    assert set(router_queue["external"]["metric"]["selector"]["matchLabels"]) == set(ROUTER_QUEUE_DEPTH._labelnames)
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    rules = yaml.safe_load(
        named(overlay, "ConfigMap", generated(overlay, "prometheus-adapter-rules"))["data"]["config.yaml"]
    )
    assert any(QUEUE_DEPTH in r["seriesQuery"] for r in rules["rules"])
    assert any(ROUTER_QUEUE_DEPTH._name in r["seriesQuery"] for r in rules["externalRules"])
    for name in ("router", "auth", "ratelimit", "edge"):
        [m] = named(overlay, "HorizontalPodAutoscaler", name)["spec"]["metrics"]
        assert m["resource"]["name"] == "cpu"
    # Every inference HPA follows the routers' queue of the model and version its Deployment serves.
    for autoscaler in of_kind(overlay, "HorizontalPodAutoscaler"):
        target = named(overlay, "Deployment", autoscaler["spec"]["scaleTargetRef"]["name"])
        if not target["metadata"]["name"].startswith("inference"):
            continue
        [container] = [c for c in target["spec"]["template"]["spec"]["containers"] if c["name"] == "inference"]
        selector = autoscaler["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
        assert selector["model"] == env(container)["MESHSERVE_INFERENCE_MODEL"], autoscaler["metadata"]["name"]
        assert selector["version"] == target["spec"]["template"]["metadata"]["labels"]["meshserve.dev/version"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_router_discovers_inference_through_headless_services(overlay: str) -> None:
    catalogue = yaml.safe_load(
        named(overlay, "ConfigMap", generated(overlay, "router-catalogue"))["data"]["catalogue.yaml"]
    )
    router = named(overlay, "Deployment", "router")["spec"]["template"]["spec"]
    assert any(v.get("configMap", {}).get("name", "").startswith("router-catalogue") for v in router["volumes"])
    served = {
        env(d["spec"]["template"]["spec"]["containers"][0]).get("MESHSERVE_INFERENCE_SERVED_NAME")
        or env(d["spec"]["template"]["spec"]["containers"][0])["MESHSERVE_INFERENCE_MODEL"]
        for d in of_kind(overlay, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/name"] == "inference"
    }
    for model in catalogue["models"]:
        assert model["id"] in served
        for version in model["versions"]:
            for address in version["replicas"]:
                assert address.startswith("dns:///")
                service = named(overlay, "Service", address.removeprefix("dns:///").rsplit(":", 1)[0])
                assert service["spec"]["clusterIP"] == "None"
                assert any(
                    service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                    for d in of_kind(overlay, "Deployment")
                    if d["metadata"]["labels"]["app.kubernetes.io/name"] == "inference"
                )


def test_the_canary_splits_90_10_over_two_versions() -> None:
    catalogue = yaml.safe_load(
        named("canary", "ConfigMap", generated("canary", "router-catalogue"))["data"]["catalogue.yaml"]
    )
    [model] = catalogue["models"]
    assert [(v["name"], v["weight"]) for v in model["versions"]] == [("v1", 90), ("v2", 10)]
    v2 = named("canary", "Deployment", "inference-v2")
    assert v2["spec"]["selector"]["matchLabels"]["meshserve.dev/version"] == "v2"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_where_the_overlay_says(overlay: str) -> None:
    for d in of_kind(overlay, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        gpus = spec["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if overlay != "cpu-dev" and d["metadata"]["labels"]["app.kubernetes.io/name"] == "inference":
            assert gpus == "1"
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
            assert spec["nodeSelector"]
        else:
            assert gpus is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_edge_is_reachable_from_outside(overlay: str) -> None:
    policies = of_kind(overlay, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny, "no default-deny policy"
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            if "from" not in rule:
                assert p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "edge"
    lb = [s for s in of_kind(overlay, "Service") if s["spec"].get("type") == "LoadBalancer"]
    assert [s["metadata"]["name"] for s in lb] == ["edge"]


def test_the_edge_config_map_holds_the_generated_envoy_config_for_in_cluster_services() -> None:
    config = yaml.safe_load(named("gpu", "ConfigMap", generated("gpu", "envoy-config"))["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert {clusters[n]["type"] for n in ("router", "auth", "ratelimit", "billing")} == {"STRICT_DNS"}
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8443}
    # Envoy sheds load on its own heap limit before the container's memory limit kills it.
    edge = named("gpu", "Deployment", "edge")["spec"]["template"]["spec"]["containers"][0]
    limit = edge["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    heap = next(m for m in config["overload_manager"]["resource_monitors"] if m["name"].endswith("fixed_heap"))
    assert heap["typed_config"]["max_heap_size_bytes"] < int(limit[:-2]) * 1024 * 1024


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policies_let_the_edge_reach_every_upstream_of_its_config(overlay: str) -> None:
    config = yaml.safe_load(named(overlay, "ConfigMap", generated(overlay, "envoy-config"))["data"]["envoy.yaml"])
    upstreams = {c["name"] for c in config["static_resources"]["clusters"]}
    reachable = set()
    for p in of_kind(overlay, "NetworkPolicy"):
        target = p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        for rule in p["spec"].get("ingress", []):
            sources = [f.get("podSelector", {}).get("matchLabels", {}) for f in rule.get("from", [])]
            if {"app.kubernetes.io/name": "edge"} in sources:
                reachable.add(target)
    # The trace collector lives outside the namespace; these policies govern only ingress into it.
    in_namespace = upstreams - {"otlp"}
    assert in_namespace == {"router", "auth", "ratelimit", "billing"}
    assert in_namespace <= reachable
