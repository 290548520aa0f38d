"""TLS at the edge (`meshserve up --tls`): the OpenAI SDK and native gRPC over TLS with the local CA;
a client that does not trust it fails; plain HTTP to the TLS port gets no answer."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.api import httpbody_pb2

from meshserve.llm.v2 import llm_pb2_grpc
from services.mesh.local import LocalMesh
from services.runtime import tls
from tests.e2e.helpers import served_certificate
from tests.integration import scripted_inference
from tests.integration.bystanders import Bystanders

MODEL = "smollm2-135m-instruct"
RULES = Path(__file__).with_name("ratelimits-hardening.yaml")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("edge-tls"), RULES, 3, 0.02, edge_tls=True) as m:
        yield m


def test_the_openai_sdk_reaches_the_edge_over_tls_with_the_local_ca(mesh: LocalMesh) -> None:
    assert mesh.edge_url.startswith("https://") and mesh.edge_ca is not None
    with httpx.Client(verify=ssl.create_default_context(cafile=str(mesh.edge_ca))) as http:
        client = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=mesh.user_key, http_client=http)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        assert chunks[-1].choices[0].finish_reason == "stop"
        # HTTP/2 by ALPN too, on the same port.
        assert http.get(f"{mesh.edge_url}/health").status_code == 200


def test_native_grpc_reaches_the_edge_over_tls(mesh: LocalMesh) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with mesh.edge_channel() as channel:
        reply = llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(
            httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(body).encode()),
            metadata=(("authorization", f"Bearer {mesh.user_key}"),),
            timeout=30,
        )
    assert json.loads(reply.data)["choices"][0]["message"]["content"]


def test_a_client_that_does_not_trust_the_ca_fails_and_plain_http_gets_no_answer(mesh: LocalMesh) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{mesh.edge_url}/health")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{mesh.edge.host}:{mesh.edge.port}/health", timeout=5)
    target = f"{mesh.edge.host}:{mesh.edge.port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials()) as untrusting:
        with pytest.raises(grpc.RpcError) as refused:
            llm_pb2_grpc.LlmServiceStub(untrusting).CreateChatCompletion(httpbody_pb2.HttpBody(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_keys_cli_manages_keys_through_a_tls_edge(mesh: LocalMesh) -> None:
    cli = [str(Path(sys.executable).parent / "meshserve"), "keys", "list", "--tenant", "default"]
    where = ["--edge", f"{mesh.edge.host}:{mesh.edge.port}", "--admin-key", mesh.admin_key]
    env = {"COLUMNS": "200", "MESHSERVE_EDGE_CA": str(mesh.edge_ca)}
    listed = subprocess.run([*cli, *where], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "first key" in listed.stdout, listed.stdout + listed.stderr
    plain = subprocess.run([*cli, *where], capture_output=True, text=True, env={"COLUMNS": "200"})
    assert plain.returncode != 0, "the CLI spoke plaintext to a TLS edge"


def _served_certificate(mesh: LocalMesh) -> bytes:
    return served_certificate(mesh.edge.port, ssl.create_default_context(cafile=str(mesh.edge_ca)), "edge")


def test_a_renewed_edge_certificate_is_served_without_a_dropped_request(mesh: LocalMesh) -> None:
    before = _served_certificate(mesh)
    with Bystanders(mesh, 4):
        time.sleep(1)
        renewed = tls.issue(mesh.options.state_dir / "tls", "edge", renew=True)
        time.sleep(2)
    expected = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    deadline = time.monotonic() + 10
    while (now := _served_certificate(mesh)) != expected:
        assert time.monotonic() < deadline, "the edge still serves the old certificate"
        time.sleep(0.2)
    assert now != before
