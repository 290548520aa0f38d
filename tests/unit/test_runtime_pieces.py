"""Runtime pieces without a server: error-to-status mapping, JSON logs, the catalogue file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest

from services.router.catalogue import Catalogue
from services.runtime import errors
from services.runtime.interceptors import status_of
from services.runtime.logs import JsonFormatter


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted("x", 2.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.DomainError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_domain_error_has_its_own_status(exc: errors.DomainError, code: grpc.StatusCode) -> None:
    assert status_of(exc) == code


def test_json_logs_carry_extra_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "listening", None, None)
    record.grpc_port = 1234
    line = json.loads(JsonFormatter("router").format(record))
    assert line["service"] == "router" and line["msg"] == "listening" and line["grpc_port"] == 1234
    assert line["level"] == "info" and line["ts"].endswith("Z")


def test_catalogue_reads_models_and_rejects_entries_without_replicas(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - id: a\n    replicas: ['127.0.0.1:1']\n    created: 5\n")
    entry = Catalogue.from_yaml(good).get("a")
    assert entry.versions[0].replicas == ("127.0.0.1:1",) and entry.created == 5 and entry.owned_by == "meshserve"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - id: a\n")
    with pytest.raises(errors.InvalidArgument, match="replica"):
        Catalogue.from_yaml(bad)
    pools = tmp_path / "pools.yaml"
    pools.write_text("models:\n  - id: a\n    replicas: ['h:1']\n    pool_weights: {spot: 2, on-demand: 1}\n")
    assert Catalogue.from_yaml(pools).get("a").versions[0].pool_weights == {"spot": 2.0, "on-demand": 1.0}
    pools.write_text("models:\n  - id: a\n    replicas: ['h:1']\n    pool_weights: {spot: 0}\n")
    with pytest.raises(errors.InvalidArgument, match="pool_weights"):
        Catalogue.from_yaml(pools)


def test_vllm_ipc_sockets_fit_a_unix_socket_path_from_any_checkout() -> None:
    from services.inference.config import InferenceSettings

    deep = "/tmp/" + "/".join(["a-rather-long-folder-name"] * 8) + "/vllm-cache"
    env = InferenceSettings(cache_dir=deep).vllm_env()
    # vLLM appends a 36-character uuid; the whole path must stay under 107 bytes.
    assert len(env["VLLM_RPC_BASE_PATH"]) + 1 + 36 < 100
    assert env["VLLM_CACHE_ROOT"] == deep


def test_caller_comes_from_the_edge_headers_and_is_required_by_default() -> None:
    from services.router import caller

    c = caller.from_metadata(
        {"x-meshserve-key-id": "key_1", "x-meshserve-tenant": "acme", "x-meshserve-models": "a,b"}, required=True
    )
    assert c.tenant == "acme" and c.may_use("a") and not c.may_use("c")
    assert caller.from_metadata({"x-meshserve-key-id": "key_1"}, required=True).allowed_models is None
    with pytest.raises(errors.Unauthenticated):
        caller.from_metadata({}, required=True)
    assert caller.from_metadata({}, required=False) is caller.INTERNAL


def test_a_90_10_canary_splits_traffic_by_weight(tmp_path: Path) -> None:
    import random

    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - id: m\n    versions:\n"
        "      - {name: v1, weight: 90, replicas: ['dns:///v1:50051']}\n"
        "      - {name: v2, weight: 10, replicas: ['dns:///v2:50051']}\n"
    )
    entry = Catalogue.from_yaml(path).get("m")
    rng = random.Random(7)
    picks = [entry.pick(rng).name for _ in range(1000)]
    assert 870 <= picks.count("v1") <= 930
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - id: m\n    versions: [{name: v1, weight: 0, replicas: ['a:1']}]\n")
    with pytest.raises(errors.InvalidArgument, match="positive weight"):
        Catalogue.from_yaml(bad)


def test_the_catalogue_file_reloads_when_changed_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    import os

    from services.runtime.watched import WatchedFile

    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - {id: a, replicas: ['h:1']}\n")
    followed = WatchedFile(path, Catalogue.from_yaml, "catalogue")
    assert not followed.refresh()
    path.write_text("models:\n  - {id: b, replicas: ['h:1']}\n  - {id: c, replicas: ['h:2']}\n")
    os.utime(path, (1, 1))
    assert followed.refresh()
    assert [e.id for e in followed.current.entries()] == ["b", "c"]
    path.write_text("models:\n  - {id: broken}\n")
    assert not followed.refresh()
    assert [e.id for e in followed.current.entries()] == ["b", "c"]


def test_the_routers_default_catalogue_exists_and_parses() -> None:
    from services.router.config import RouterSettings

    root = Path(__file__).resolve().parents[2]
    entry = Catalogue.from_yaml(root / RouterSettings().catalogue).get("smollm2-135m-instruct")
    assert entry.versions[0].replicas == ("127.0.0.1:50051",)


def test_listening_ports_are_picked_below_the_ephemeral_range() -> None:
    # Outgoing connections take their local ports from the ephemeral range: a port picked there could be
    # taken before its service binds it (an edge failing with "address in use" in CI).
    import socket

    from services.mesh.procs import LISTEN_PORTS, _ephemeral_start, free_port

    high = min(LISTEN_PORTS[1], _ephemeral_start())
    ports = {free_port() for _ in range(20)}
    assert all(LISTEN_PORTS[0] <= p < high for p in ports) and len(ports) > 1
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing held it
