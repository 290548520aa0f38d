"""A thin typed helper over meshserve's generated stubs: the edge's channel, the API key, whole and streamed
JSON calls of `meshserve.llm.v2` (the OpenAI-shaped API over native gRPC). Python 3.9+; grpcio and protobuf only.

The stubs themselves are importable as `meshserve.<service>.<version>` for everything else (the typed
`meshserve.llm.v1` messages, the admin API of `meshserve.auth.v1`, usage from `meshserve.billing.v1`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.api import httpbody_pb2

from meshserve.llm.v2 import llm_pb2_grpc

__all__ = ["Edge", "StreamError", "metadata"]

JSON = "application/json"
Metadata = tuple[tuple[str, str], ...]


class StreamError(Exception):
    """An error the mesh sent inside a stream, after its first event (the call itself had already succeeded)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "stream failed"))
        self.error = error


def metadata(api_key: str) -> Metadata:
    """The call metadata that carries an API key, as the edge reads it."""
    return (("authorization", f"Bearer {api_key}"),)


def _events(data: bytes) -> Iterator[dict[str, Any]]:
    """The JSON events of one streamed message (`data: {...}` lines); `[DONE]` and comments are skipped."""
    for line in data.decode("utf-8").splitlines():
        if line.startswith("data:"):
            payload = line[len("data:") :].strip()
            if payload and payload != "[DONE]":
                yield json.loads(payload)


class Edge:
    """A connection to a meshserve edge (plaintext, or TLS trusting ca) with one API key."""

    def __init__(self, target: str, api_key: str, ca: str | Path | None = None, timeout: float = 600.0) -> None:
        if ca is None:
            self.channel = grpc.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials)
        self.metadata = metadata(api_key)
        self.timeout = timeout
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channel)

    def _body(self, body: Mapping[str, Any]) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type=JSON, data=json.dumps(body).encode())

    def chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A whole chat completion: OpenAI's request body in, its response body out."""
        reply = self.llm.CreateChatCompletion(self._body(body), metadata=self.metadata, timeout=self.timeout)
        result: dict[str, Any] = json.loads(reply.data)
        return result

    def stream_chat(self, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """A streamed chat completion's chunks as they come; an error after the first chunk raises StreamError.
        Closing the iterator early cancels the call (and the generation)."""
        call = self.llm.StreamChatCompletion(
            self._body({**body, "stream": True}), metadata=self.metadata, timeout=self.timeout
        )
        try:
            for message in call:
                for event in _events(message.data):
                    if "error" in event and "choices" not in event:
                        raise StreamError(event["error"])
                    yield event
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Edge:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
