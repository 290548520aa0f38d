"""Clients the end-to-end tests use: the OpenAI SDK and gRPC stubs, pointed at the mesh."""

from __future__ import annotations

import grpc
from openai import OpenAI

from meshserve.auth.v1 import auth_pb2
from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from meshserve.llm.v1 import llm_pb2_grpc
from services.mesh.local import LocalMesh

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def openai_client(mesh: LocalMesh, api_key: str | None = None) -> OpenAI:
    """The official SDK on the edge, as the mesh's first user key unless told otherwise."""
    key = mesh.user_key if api_key is None else api_key
    return OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=key, max_retries=0, timeout=120)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def edge_stub(mesh: LocalMesh) -> tuple[grpc.Channel, llm_pb2_grpc.LlmServiceStub]:
    channel = grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}")
    return channel, llm_pb2_grpc.LlmServiceStub(channel)


def engine_stub(mesh: LocalMesh) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.procs['inference'].grpc_port}")
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def engine_load(mesh: LocalMesh) -> inference_pb2.GetLoadResponse:
    channel, stub = engine_stub(mesh)
    with channel:
        return stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=5)


def create_key(mesh: LocalMesh, tenant: str, tpm: int = 0, rpm: int = 0) -> tuple[auth_pb2.Key, str]:
    """A new key of tenant through the admin API, with its own limits if given."""
    channel, stub, admin = mesh.admin_stub()
    with channel:
        limits = auth_pb2.KeyLimits(tokens_per_minute=tpm, requests_per_minute=rpm)
        request = auth_pb2.CreateKeyRequest(tenant=tenant, limits=limits)
        reply = stub.CreateKey(request, metadata=admin, timeout=10)
    return reply.key, reply.secret
