"""The generated edge config: transcoder, Lua and error shapes, checked on the rendered dict."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import yaml
from google.protobuf import descriptor_pb2

from deploy.envoy import mesh_tls
from deploy.envoy.config import Address, EdgeConfig, Tracing, lua_source, render
from services.runtime import tls
from services.runtime.openai_errors import ANTHROPIC_TYPES, ERROR_TYPES

CFG = EdgeConfig(listen=Address("127.0.0.1", 8080), admin=Address("127.0.0.1", 9901), router=Address("10.0.0.2", 50051))


def filters() -> dict[str, dict]:  # type: ignore[type-arg]
    hcm = render(CFG)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def test_filters_parse_the_body_then_run_lua_then_transcoder_then_router() -> None:
    assert list(filters()) == [
        "envoy.filters.http.health_check",
        "envoy.filters.http.cors",
        "envoy.filters.http.buffer",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


def test_transcoder_speaks_openai_json_and_sse() -> None:
    t = filters()["envoy.filters.http.grpc_json_transcoder"]
    assert t["services"] == ["meshserve.llm.v2.LlmService", "meshserve.llm.v1.LlmService"]
    assert t["print_options"]["preserve_proto_field_names"]
    assert t["print_options"]["always_print_primitive_fields"]
    assert t["print_options"]["stream_sse_style_delimited"]
    assert t["convert_grpc_status"]
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(t["proto_descriptor_bin"])).file
    names = [f.name for f in files]
    assert {"meshserve/llm/v1/llm.proto", "meshserve/billing/v1/billing.proto"} <= set(names)
    assert "google/api/annotations.proto" in names and "google/protobuf/struct.proto" in names
    for f in files:  # every file comes after the files it imports
        assert all(names.index(dep) < names.index(f.name) for dep in f.dependency)


def test_usage_queries_reach_billing_and_nothing_else_of_it_does() -> None:
    cfg = EdgeConfig(listen=CFG.listen, admin=CFG.admin, router=CFG.router, billing=Address("billing", 50051))
    hcm = render(cfg)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    to_billing = [r["match"] for r in routes if r["route"]["cluster"] == "billing"]
    assert to_billing == [{"path": "/meshserve.billing.v1.BillingService/GetUsage"}]
    transcoder = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["typed_config"]["services"] == [
        "meshserve.llm.v2.LlmService",
        "meshserve.llm.v1.LlmService",
        "meshserve.billing.v1.BillingService",
    ]


def test_lua_gets_every_error_type_and_no_placeholder() -> None:
    lua = lua_source()
    assert "%%" not in lua
    for status, (kind, code) in ERROR_TYPES.items():
        assert f'[{status}] = {{"{kind}", "{code}"}}' in lua


def test_router_cluster_speaks_http2_at_the_given_address() -> None:
    cluster = render(CFG)["static_resources"]["clusters"][0]
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "10.0.0.2", "port_value": 50051}


def test_streams_have_no_overall_timeout_and_whole_replies_do() -> None:
    hcm = render(CFG)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {
        r["match"].get("path", r["match"].get("prefix")): r["route"]
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
    }
    for method in ("StreamChatCompletion", "StreamCompletion"):
        assert routes[f"/meshserve.llm.v1.LlmService/{method}"]["timeout"] == "0s"
    for method in ("StreamChatCompletion", "StreamCompletion", "StreamMessage", "StreamResponse"):
        assert routes[f"/meshserve.llm.v2.LlmService/{method}"]["timeout"] == "0s"
    assert "rate_limits" not in routes["/v1/messages"]  # the router counts a generation's requests
    assert "rate_limits" not in routes["/v1/responses"]
    assert routes["/"]["timeout"] == f"{CFG.unary_timeout_s}s"


def test_the_edge_has_the_limits_an_internet_facing_envoy_needs() -> None:
    rendered = render(CFG)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["request_headers_timeout"] == "10s" and hcm["request_timeout"] == "60s"
    assert hcm["max_request_headers_kb"] == 32
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
    monitors = {m["name"]: m["typed_config"] for m in rendered["overload_manager"]["resource_monitors"]}
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]
    actions = {a["name"] for a in rendered["overload_manager"]["actions"]}
    assert "envoy.overload_actions.stop_accepting_requests" in actions
    transcoder = filters()["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["ignore_unknown_query_parameters"]


def test_a_request_that_never_reached_a_router_is_retried_with_room_for_every_caller() -> None:
    rendered = render(CFG)["static_resources"]
    routes = rendered["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    for route in routes["virtual_hosts"][0]["routes"]:
        retry = route["route"]["retry_policy"]
        assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request"}
    router = next(c for c in rendered["clusters"] if c["name"] == "router")
    assert router["circuit_breakers"]["thresholds"][0]["max_retries"] >= 256


def test_the_model_and_stream_flag_are_read_by_a_json_parser_for_the_lua_filter() -> None:
    rules = filters()["envoy.filters.http.json_to_metadata"]["request_rules"]
    keys = [r["selectors"] for r in rules["rules"]]
    assert keys == [[{"key": "model"}], [{"key": "stream"}]]
    assert "meshserve.body" in lua_source()


def test_local_replies_are_openai_shaped() -> None:
    hcm = render(CFG)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    mappers = [m for m in hcm["local_reply_config"]["mappers"] if "status_code_filter" in m["filter"]]
    by_status = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m["body_format_override"]
        for m in mappers
    }
    assert by_status[404]["json_format"]["error"]["type"] == "not_found_error"
    assert by_status[400]["json_format"]["error"]["message"] == "%LOCAL_REPLY_BODY%"


def test_local_replies_on_the_messages_route_are_anthropic_shaped() -> None:
    hcm = render(CFG)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    on_messages = {}
    for mapper in hcm["local_reply_config"]["mappers"]:
        filters = mapper["filter"].get("and_filter", {}).get("filters", [])
        paths = [f["header_filter"]["header"]["string_match"]["prefix"] for f in filters if "header_filter" in f]
        if paths == ["/v1/messages"]:
            status = next(f for f in filters if "status_code_filter" in f)["status_code_filter"]
            on_messages[status["comparison"]["value"]["default_value"]] = mapper["body_format_override"]["json_format"]
    assert on_messages[401] == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "%LOCAL_REPLY_BODY%"},
    }
    assert on_messages[429]["error"]["type"] == "rate_limit_error"
    assert on_messages[503]["error"]["type"] == "overloaded_error"
    lua = lua_source()
    for status, kind in ANTHROPIC_TYPES.items():
        assert f'[{status}] = "{kind}"' in lua


def test_with_auth_and_rate_limits_the_model_header_is_set_before_the_limit_is_checked() -> None:
    from dataclasses import replace

    full = render(replace(CFG, auth=Address("auth", 1), ratelimit=Address("rl", 2), ratelimit_fail_closed=True))
    hcm = full["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.health_check",
        "envoy.filters.http.cors",
        "envoy.filters.http.buffer",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.lua",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    rl = hcm["http_filters"][6]["typed_config"]
    assert rl["failure_mode_deny"] and rl["rate_limited_as_resource_exhausted"]
    admin_route, *api_routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert "rate_limits" not in admin_route["route"]
    # Generation's request limits are the router's (its first reservation counts the request); every other
    # route's are checked here.
    generation = [r for r in api_routes if "path" in r["match"]]
    # Matched by the gRPC path (the router filter, after the transcoder) and by the REST path (the rate-limit
    # filter, before it).
    assert sorted(r["match"]["path"] for r in generation if r["match"]["path"].startswith("/v1/")) == [
        "/v1/chat/completions",
        "/v1/chat/completions:stream",
        "/v1/completions",
        "/v1/completions:stream",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages:stream",
        "/v1/responses",
        "/v1/responses:stream",
    ]
    grpc_paths = [r["match"]["path"].rsplit("/", 1)[1] for r in generation if not r["match"]["path"].startswith("/v1/")]
    openai = ["CreateChatCompletion", "StreamChatCompletion", "CreateCompletion", "StreamCompletion"]
    v2_only = ["CreateMessage", "StreamMessage", "CreateResponse", "StreamResponse", "CreateEmbedding"]
    assert sorted(grpc_paths) == sorted([*openai, *openai, *v2_only])
    assert not any("rate_limits" in r["route"] for r in generation)
    (rest,) = [r for r in api_routes if "path" not in r["match"]]
    limits = rest["route"]["rate_limits"]
    descriptors = [[a["request_headers"]["descriptor_key"] for a in d["actions"]] for d in limits]
    assert descriptors == [["tenant", "key_id", "key_rpm"], ["tenant"], ["tenant", "model"]]
    assert {c["name"] for c in full["static_resources"]["clusters"]} == {"router", "auth", "ratelimit"}


def test_tracing_is_an_opentelemetry_provider_with_its_own_cluster_or_absent() -> None:
    def hcm_and_clusters(cfg: EdgeConfig) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
        rendered = render(cfg)["static_resources"]
        hcm = rendered["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm, [c["name"] for c in rendered["clusters"]]

    hcm, clusters = hcm_and_clusters(CFG)
    assert "tracing" not in hcm and "otlp" not in clusters
    traced = EdgeConfig(
        listen=CFG.listen, admin=CFG.admin, router=CFG.router, tracing=Tracing(Address("127.0.0.1", 4317), 10.0)
    )
    hcm, clusters = hcm_and_clusters(traced)
    assert hcm["tracing"]["random_sampling"] == {"value": 10.0}
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "otlp"
    assert "otlp" in clusters


def test_with_mesh_tls_every_mesh_cluster_is_mutual_tls_to_the_service_it_names(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        CFG,
        auth=Address("10.0.0.3", 1),
        ratelimit=Address("10.0.0.4", 1),
        billing=Address("10.0.0.5", 1),
        tracing=Tracing(Address("10.0.0.6", 4317)),
        mesh_sds=tmp_path,
    )
    clusters = {c["name"]: c for c in render(cfg)["static_resources"]["clusters"]}
    assert set(clusters) == {"router", "auth", "ratelimit", "billing", "otlp"}
    for name in ("router", "auth", "ratelimit", "billing"):
        socket = clusters[name]["transport_socket"]["typed_config"]
        assert socket["@type"].endswith("UpstreamTlsContext")
        context = socket["common_tls_context"]
        assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
        assert context["tls_certificate_sds_secret_configs"][0]["name"] == mesh_tls.CLIENT_SECRET
        san = context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
        assert san == [{"san_type": "DNS", "matcher": {"exact": name}}]
    # The collector is not a mesh service; without mesh_sds nothing is TLS.
    assert "transport_socket" not in clusters["otlp"]
    assert all("transport_socket" not in c for c in render(CFG)["static_resources"]["clusters"])


def test_the_sds_files_name_the_edge_certificate_and_watch_its_folder(tmp_path: Path) -> None:
    files = tls.issue(tmp_path / "ca", "edge")
    folder = mesh_tls.write_sds(files, tmp_path / "sds")
    client = yaml.safe_load((folder / mesh_tls.SDS_FILES[mesh_tls.CLIENT_SECRET]).read_text())["resources"]
    assert [r["name"] for r in client] == [mesh_tls.CLIENT_SECRET]
    certificate = client[0]["tls_certificate"]
    assert certificate["certificate_chain"]["filename"] == str(files.cert.absolute())
    assert certificate["watched_directory"]["path"] == str(files.folder.absolute())


def test_the_edge_serves_tls_with_both_http_versions_only_when_asked(tmp_path: Path) -> None:
    def chain(cfg: EdgeConfig) -> dict:  # type: ignore[type-arg]
        return render(cfg)["static_resources"]["listeners"][0]["filter_chains"][0]  # type: ignore[no-any-return]

    assert "transport_socket" not in chain(CFG)
    socket = chain(dataclasses.replace(CFG, edge_sds=tmp_path))["transport_socket"]["typed_config"]
    assert socket["@type"].endswith("DownstreamTlsContext")
    context = socket["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert context["tls_certificate_sds_secret_configs"][0]["name"] == mesh_tls.SERVER_SECRET


def test_where_the_router_checks_keys_only_generation_routes_skip_ext_authz_and_drop_forged_identity() -> None:
    from deploy.envoy.settings import GENERATION_METHODS, generation_rest_paths
    from services.runtime.identity import IDENTITY_HEADERS

    def routes(cfg: EdgeConfig) -> list[dict]:  # type: ignore[type-arg]
        hcm = render(cfg)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return list(hcm["route_config"]["virtual_hosts"][0]["routes"])

    def skipped(route: dict) -> bool:  # type: ignore[type-arg]
        config = route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})
        return bool(config.get("disabled"))

    checked = dataclasses.replace(CFG, auth=Address("auth", 1), router_checks_keys=True)
    generation = {f"/meshserve.llm.{v}.LlmService/{m}" for v in ("v1", "v2") for m in GENERATION_METHODS}
    generation = {p for p in generation if p.startswith("/meshserve.llm.v2") or "Chat" in p or "Completion" in p}
    generation |= set(generation_rest_paths())
    skipping = {r["match"].get("path", r["match"].get("prefix")) for r in routes(checked) if skipped(r)}
    assert skipping == generation
    for route in routes(checked):
        if skipped(route):
            assert set(route["request_headers_to_remove"]) == set(IDENTITY_HEADERS)
    # Without the router's check (or without auth), every route keeps the edge's.
    assert not any(skipped(r) for r in routes(dataclasses.replace(checked, router_checks_keys=False)))
    assert not any(skipped(r) for r in routes(dataclasses.replace(checked, auth=None)))
