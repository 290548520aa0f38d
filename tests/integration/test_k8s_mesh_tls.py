"""The rendered manifests' mutual TLS: every service's certificate of its identity from the mesh CA, and an edge
that serves TLS only and calls every upstream with mutual TLS."""

from __future__ import annotations

import pytest
import yaml

from deploy.k8s.render import OVERLAYS
from services.runtime import tls
from services.runtime.callers import CALLERS
from tests.integration.k8s_docs import env, generated, issued, named, of_kind, pod_specs

MESH_SERVICES = ("auth", "ratelimit", "billing", "router", "inference")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_serves_and_calls_with_a_certificate_of_its_identity_from_the_mesh_ca(overlay: str) -> None:
    certificates = issued(overlay)
    issuers = {d["metadata"]["name"]: d for d in of_kind(overlay, "Issuer")}
    [mesh_ca] = [c for c in certificates.values() if c["spec"].get("isCA")]
    identities = set()
    for workload, spec in pod_specs(overlay):
        identity = workload["metadata"]["labels"]["app.kubernetes.io/name"]
        if identity not in (*MESH_SERVICES, "edge", "redis"):
            continue
        identities.add(identity)
        container = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        secret = secrets[mounts["/var/run/secrets/meshserve/tls"]]
        where = f"{overlay}/{workload['metadata']['name']}"
        if identity in MESH_SERVICES:
            prefix = f"MESHSERVE_{identity.upper()}_TLS_"
            files = {k: v for k, v in env(container).items() if k.startswith(prefix)}
            assert files == {
                prefix + "CERT_FILE": "/var/run/secrets/meshserve/tls/tls.crt",
                prefix + "KEY_FILE": "/var/run/secrets/meshserve/tls/tls.key",
                prefix + "CA_FILE": "/var/run/secrets/meshserve/tls/ca.crt",
            }, where
        cert = certificates[secret]["spec"]
        # The SPIFFE ID the services' caller matrix reads, and the DNS name each client checks.
        assert cert["uris"] == [tls.spiffe_id(identity)], where
        assert identity in cert["dnsNames"] and {"server auth", "client auth"} <= set(cert["usages"]), where
        assert issuers[cert["issuerRef"]["name"]]["spec"]["ca"]["secretName"] == mesh_ca["spec"]["secretName"]
        assert cert["privateKey"]["rotationPolicy"] == "Always", where
    # Every identity the caller matrix names has a workload with its certificate ("admin" is the operator's).
    assert identities >= set().union(*CALLERS.values()) - {"admin"}
    # Redis is TLS only and wants a client certificate; its clients dial it over TLS by the name it carries.
    [redis] = [c for w, spec in pod_specs(overlay) if w["metadata"]["name"] == "redis" for c in spec["containers"][:1]]
    assert "--tls-auth-clients" in redis["args"] and redis["args"][redis["args"].index("--port") + 1] == "0"
    urls = [
        v for _, spec in pod_specs(overlay) for k, v in env(spec["containers"][0]).items() if k.endswith("REDIS_URL")
    ]
    # auth, ratelimit, billing, and the router's key store, limits, stored responses and response cache.
    assert len(urls) == 7 and set(urls) == {"rediss://redis:6379/0"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_edge_serves_tls_only_and_every_upstream_of_it_is_mutual_tls(overlay: str) -> None:
    config_map = named(overlay, "ConfigMap", generated(overlay, "envoy-config"))["data"]
    config = yaml.safe_load(config_map["envoy.yaml"])
    [listener] = config["static_resources"]["listeners"]
    downstream = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert downstream["alpn_protocols"] == ["h2", "http/1.1"]
    assert downstream["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    edge_service = named(overlay, "Service", "edge")
    assert [p["port"] for p in edge_service["spec"]["ports"]] == [443]
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "otlp":  # the cluster's trace collector, outside the mesh
            continue
        socket = cluster["transport_socket"]["typed_config"]
        assert socket["sni"] == cluster["name"]
        sans = socket["common_tls_context"]["combined_validation_context"]["default_validation_context"]
        assert sans["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": cluster["name"]}}]
    # The SDS files name certificates in the edge's Secret volumes: its mesh identity and its server certificate.
    edge = named(overlay, "Deployment", "edge")["spec"]["template"]["spec"]
    mounted = {
        m["mountPath"]: next(v["secret"]["secretName"] for v in edge["volumes"] if v["name"] == m["name"])
        for m in edge["containers"][0]["volumeMounts"]
        if any(v["name"] == m["name"] and "secret" in v for v in edge["volumes"])
    }
    certificates = issued(overlay)
    for sds_file in ("sds-cert.yaml", "sds-ca.yaml", "sds-edge-server.yaml"):
        [secret] = yaml.safe_load(config_map[sds_file])["resources"]
        body = secret.get("tls_certificate") or secret["validation_context"]
        folder = body["watched_directory"]["path"]
        assert folder in mounted and mounted[folder] in certificates, sds_file
    assert certificates[mounted["/var/run/secrets/meshserve/tls"]]["spec"]["uris"] == [tls.spiffe_id("edge")]
