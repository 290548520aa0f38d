"""OpenAI's embeddings API through the edge with OpenAI's own SDK, side by side with vLLM's own server.

Both serve the packaged all-MiniLM-L6-v2 folder from the model store on vLLM's pooling runner: the vectors
must agree to a tolerance (the same engine, batched differently), the usage exactly.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.api import httpbody_pb2

from bench.edge_vs_vllm import vllm_server
from meshserve.auth.v1 import auth_pb2
from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.inference import model_store
from services.inference.config import InferenceSettings
from services.mesh.local import LocalMesh
from tests.conftest import EMBEDDING_MODEL, MODEL
from tests.e2e.helpers import bearer, create_key, openai_client
from tests.e2e.test_billing import ledger_line

pytestmark = pytest.mark.mesh

TEXTS = ["The capital of France is Paris.", "Embeddings map text to vectors.", "hello"]


@pytest.fixture(scope="module")
def vllm(mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """vLLM's own server on the embedding model, with the replicas' settings (its own context length)."""
    folder = model_store.ModelStore(mesh.options.model_store).path(EMBEDDING_MODEL)
    state, settings = tmp_path_factory.mktemp("vllm-embed"), InferenceSettings(max_model_len=0)
    with vllm_server(folder, state, settings, EMBEDDING_MODEL) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-4) for x, y in zip(a, b, strict=True))


def test_a_batch_of_strings_and_of_token_ids_gives_vllms_vectors(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    for given in (TEXTS, "one string", [[101, 7592, 2088, 102], [101, 2088, 102]], [101, 7592, 102]):
        ours, theirs = (c.embeddings.create(model=EMBEDDING_MODEL, input=given) for c in (openai_client(mesh), vllm))
        assert [d.index for d in ours.data] == [d.index for d in theirs.data]
        assert all(close(o.embedding, t.embedding) for o, t in zip(ours.data, theirs.data, strict=True))
        assert len(ours.data[0].embedding) == 384
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > 0
        assert ours.model == EMBEDDING_MODEL


def test_base64_is_the_float_vector_packed(mesh: LocalMesh) -> None:
    sdk = openai_client(mesh)
    floats = sdk.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS[0]).data[0].embedding
    # The SDK decodes base64 itself; the raw body carries it packed as little-endian float32.
    r = httpx.post(
        f"{mesh.edge_url}/v1/embeddings",
        json={"model": EMBEDDING_MODEL, "input": TEXTS[0], "encoding_format": "base64"},
        headers=dict(bearer(mesh.user_key)),
        timeout=60,
    )
    packed = base64.b64decode(r.json()["data"][0]["embedding"])
    unpacked = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert close(unpacked, floats)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [["a"]]}, "input[0]"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "colour": 1}, "colour"),
    ],
)
def test_what_the_contract_forbids_is_a_400_naming_the_field(mesh: LocalMesh, body: dict[str, Any], named: str) -> None:
    r = httpx.post(
        f"{mesh.edge_url}/v1/embeddings",
        json={"model": EMBEDDING_MODEL, **body},
        headers=dict(bearer(mesh.user_key)),
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and named in r.json()["error"]["message"]


def test_each_model_answers_only_its_own_endpoints(mesh: LocalMesh) -> None:
    sdk = openai_client(mesh)
    with pytest.raises(openai.BadRequestError, match="does not serve"):
        sdk.embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.BadRequestError, match="does not serve"):
        sdk.chat.completions.create(model=EMBEDDING_MODEL, messages=[{"role": "user", "content": "hi"}])
    listed = {m.id for m in sdk.models.list()}
    assert {MODEL, EMBEDDING_MODEL} <= listed


def test_embeddings_are_billed_and_limited_by_their_input_tokens(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "embeddings-billed")
    sdk = openai_client(mesh, secret)
    told = [sdk.embeddings.create(model=EMBEDDING_MODEL, input=given).usage for given in (TEXTS, TEXTS[0])]
    line = ledger_line(mesh, key.key_id, 2)
    assert line.requests == 2 and line.completion_tokens == 0
    assert line.prompt_tokens == sum(u.prompt_tokens for u in told)
    # A batch larger than the key's token window is refused before the engine embeds it.
    _, small = create_key(mesh, "embeddings-limited", tpm=20)
    with pytest.raises(openai.RateLimitError):
        openai_client(mesh, small).embeddings.create(model=EMBEDDING_MODEL, input=TEXTS * 3)


def test_a_key_limited_to_the_chat_model_may_not_embed(mesh: LocalMesh) -> None:
    channel, stub, admin = mesh.admin_stub()
    with channel:
        request = auth_pb2.CreateKeyRequest(tenant="chat-only", allowed_models=[MODEL])
        reply = stub.CreateKey(request, metadata=admin, timeout=10)
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(mesh, reply.secret).embeddings.create(model=EMBEDDING_MODEL, input="hi")


def test_dimensions_on_a_model_without_matryoshka_is_a_400_as_on_vllm(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    for client in (openai_client(mesh), vllm):
        with pytest.raises(openai.BadRequestError, match=r"(?i)matryoshka|dimensions"):
            client.embeddings.create(model=EMBEDDING_MODEL, input="hi", dimensions=128)


def test_grpc_clients_get_the_same_vectors(mesh: LocalMesh) -> None:
    body = {"model": EMBEDDING_MODEL, "input": TEXTS[:2]}
    rest = openai_client(mesh).embeddings.create(**body, encoding_format="float")
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = llm_v2_pb2_grpc.LlmServiceStub(channel)
        request = httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(body).encode())
        native = json.loads(stub.CreateEmbedding(request, metadata=bearer(mesh.user_key), timeout=60).data)
    assert [d["index"] for d in native["data"]] == [0, 1]
    assert all(close(n["embedding"], r.embedding) for n, r in zip(native["data"], rest.data, strict=True))
    assert native["usage"]["prompt_tokens"] == rest.usage.prompt_tokens
