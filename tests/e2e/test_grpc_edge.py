"""A native gRPC client with the stubs from gen/, through the same Envoy port as REST."""

from __future__ import annotations

import grpc
import pytest

from meshserve.llm.v1 import llm_pb2
from services.mesh.local import LocalMesh
from tests.conftest import EMBEDDING_MODEL
from tests.e2e.helpers import MODEL, bearer, edge_stub, openai_client

pytestmark = pytest.mark.mesh

PROMPT = "Name three colours."


def test_grpc_stream_gets_the_same_tokens_as_rest(mesh: LocalMesh) -> None:
    params = llm_pb2.ChatCompletionParams(
        model=MODEL,
        messages=[llm_pb2.ChatMessage(role="user", content=PROMPT)],
        max_tokens=32,
        temperature=0.7,
        seed=7,
        stream=True,
        stream_options=llm_pb2.StreamOptions(include_usage=True),
    )
    channel, stub = edge_stub(mesh)
    with channel:
        chunks = list(
            stub.StreamChatCompletion(
                llm_pb2.StreamChatCompletionRequest(params=params), timeout=120, metadata=bearer(mesh.user_key)
            )
        )
    grpc_text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    rest_text = "".join(
        c.choices[0].delta.content or ""
        for c in openai_client(mesh).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=32,
            temperature=0.7,
            seed=7,
            stream=True,
        )
        if c.choices
    )
    assert grpc_text and grpc_text == rest_text


def test_grpc_errors_keep_their_status_codes_through_the_edge(mesh: LocalMesh) -> None:
    channel, stub = edge_stub(mesh)
    with channel:
        with pytest.raises(grpc.RpcError) as missing:
            stub.CreateChatCompletion(
                llm_pb2.CreateChatCompletionRequest(
                    params=llm_pb2.ChatCompletionParams(
                        model="no-such-model", messages=[llm_pb2.ChatMessage(role="user", content="hi")]
                    )
                ),
                timeout=30,
                metadata=bearer(mesh.user_key),
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as invalid:
            stub.CreateChatCompletion(
                llm_pb2.CreateChatCompletionRequest(params=llm_pb2.ChatCompletionParams(model=MODEL)),
                timeout=30,
                metadata=bearer(mesh.user_key),
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages" in (invalid.value.details() or "")
        models = stub.ListModels(llm_pb2.ListModelsRequest(), timeout=30, metadata=bearer(mesh.user_key))
        assert [m.id for m in models.data] == [MODEL, EMBEDDING_MODEL]
