"""OpenAI's Responses API (POST /v1/responses, GET /v1/responses/{id}): its request rules, and the mesh's own
store of responses behind `previous_response_id`. Imports no gRPC.

vLLM's own Responses layer on the replica answers every request statelessly (its store is one process's
memory, off by default). Conversations live here instead: a stored response is kept in Redis with the
whole conversation that led to it (its input items, the previous turns' included), scoped to the caller's
tenant and kept for a TTL. A request naming `previous_response_id` reaches the replica as the stateless
request a `store: false` client would send: the stored input, then the stored output items, then its own
input (OpenAI's rule: the previous `instructions` are not carried over).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.router.messages import text_of
from services.router.validation import finite, in_range, number
from services.runtime.errors import InvalidArgument, NotFound, echo

log = logging.getLogger(__name__)

ID_PREFIX = "resp_"
# The events of a stream that carry the response object (the last ends a whole stream).
OBJECT_EVENTS = (b"event: response.created\n", b"event: response.in_progress\n", b"event: response.completed\n")
COMPLETED_EVENT = OBJECT_EVENTS[-1]


class KeyValue(Protocol):
    """What the store needs of Redis (redis.asyncio.Redis is one)."""

    def get(self, name: str) -> Awaitable[Any]: ...

    def set(self, name: str, value: str, ex: int) -> Awaitable[Any]: ...


def contract(fields: dict[str, Any]) -> None:
    """OpenAI's rules for a Responses request that vLLM does not enforce."""
    finite(fields)
    in_range("temperature", number(fields, "temperature"), 0.0, 2.0)
    in_range("top_p", number(fields, "top_p"), 0.0, 1.0, low_open=True)
    most = number(fields, "max_output_tokens")
    if most is not None and most < 1:
        raise InvalidArgument(f"max_output_tokens: must be at least 1, got {most:g}")
    value = fields.get("input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise InvalidArgument("input: must be a string or a list of at least one input item")
    for i, item in enumerate(value if isinstance(value, list) else []):
        if not isinstance(item, dict) or not isinstance(item.get("type", item.get("role")), str):
            raise InvalidArgument(f"input[{i}]: must be an input item (an object with a type or a role)")
    if fields.get("instructions") is not None and not isinstance(fields["instructions"], str):
        raise InvalidArgument("instructions: must be a string")
    if fields.get("background"):
        raise InvalidArgument("background: is not supported (stream the response instead)")
    previous = fields.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise InvalidArgument("previous_response_id: must be a string")


def items(value: Any) -> list[Any]:
    """A request's input as a list of input items (a string is one user message)."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else list(value)


def turns(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """The conversation as (role, text) turns, instructions first: what prefix affinity keys on."""
    system = [("system", str(fields["instructions"]))] if fields.get("instructions") else []
    listed = items(fields.get("input") or [])
    return system + [(str(i.get("role", "")), text_of(i.get("content"))) for i in listed if isinstance(i, dict)]


@dataclass
class Turn:
    """One request of a conversation, as the router passes it on and stores what it answered."""

    data: bytes
    tenant: str
    store: bool
    previous_id: str | None = None
    # The whole conversation's input items, this request's last.
    conversation: list[Any] = field(default_factory=list)

    def stamped(self, response: dict[str, Any]) -> dict[str, Any]:
        """The response object as the client's request shapes it (the replica saw a stateless request)."""
        response["previous_response_id"] = self.previous_id
        response["store"] = self.store
        return response


def _key(tenant: str, response_id: str) -> str:
    return f"meshserve:responses:{tenant}:{response_id}"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ResponseStore:
    """Responses kept in Redis per tenant for a TTL: each with the conversation that led to it."""

    def __init__(self, redis: KeyValue | None, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    async def _record(self, tenant: str, response_id: str) -> dict[str, Any]:
        raw = await self._redis.get(_key(tenant, response_id)) if self._redis is not None else None
        if raw is None:
            raise NotFound(f"Response with id {echo(response_id)} not found.")
        record: dict[str, Any] = json.loads(raw)
        return record

    async def get(self, tenant: str, response_id: str) -> bytes:
        """A stored response object (NotFound for an unknown id, expired, or another tenant's)."""
        return _dumps((await self._record(tenant, response_id))["response"]).encode()

    async def turn(self, tenant: str, data: bytes) -> Turn:
        """The request as the replica answers it: a previous response's conversation before its own input."""
        try:
            fields = json.loads(data)
        except (ValueError, RecursionError):
            return Turn(data, tenant, store=False)  # refused by the contract's parse, with its message
        if not isinstance(fields, dict):
            return Turn(data, tenant, store=False)
        store = fields.pop("store", True) is not False and self.enabled
        previous = fields.pop("previous_response_id", None)
        own = fields.get("input")
        if previous is None:
            # Passed on as the client wrote it; the conversation is only read if the answer is stored.
            return Turn(data, tenant, store, None, items(own) if store and isinstance(own, str | list) else [])
        if not self.enabled:
            raise InvalidArgument("previous_response_id: this mesh keeps no responses (no response store)")
        if not isinstance(previous, str) or not isinstance(own, str | list):
            raise InvalidArgument("previous_response_id: must be a string, with input a string or a list of items")
        record = await self._record(tenant, previous)
        conversation = [*record["input"], *record["response"].get("output", []), *items(own)]
        fields["input"] = conversation
        return Turn(_dumps(fields).encode(), tenant, store, previous, conversation)

    async def keep(self, turn: Turn, response: dict[str, Any]) -> None:
        """Stores an answered turn (if the client asked), for the TTL; the response says whether it was."""
        if not (turn.store and self._redis is not None and isinstance(response.get("id"), str)):
            return
        record = {"input": turn.conversation, "response": response}
        try:
            await self._redis.set(_key(turn.tenant, response["id"]), _dumps(record), ex=self._ttl)
        except Exception as exc:  # the answer is the client's still; only its storing failed, and it says so
            log.warning("a response could not be stored", extra={"response_id": response["id"], "error": str(exc)})
            response["store"] = False


async def finish_whole(store: ResponseStore, turn: Turn, data: bytes) -> bytes:
    """A whole response body, stamped and stored."""
    response = turn.stamped(json.loads(data))
    await store.keep(turn, response)
    return _dumps(response).encode()


async def finish_event(store: ResponseStore, turn: Turn, event: bytes) -> bytes:
    """A stream's event, its response object stamped (and stored, when the stream completed)."""
    if not event.startswith(OBJECT_EVENTS):
        return event
    head, sep, data = event.partition(b"data: ")
    fields = json.loads(data)
    response = fields["response"] = turn.stamped(fields["response"])
    if event.startswith(COMPLETED_EVENT):
        await store.keep(turn, response)
    return head + sep + _dumps(fields).encode() + b"\n\n"


def error_event(status: int, message: str) -> bytes:
    """An error after a stream began, as the Responses API sends it (the OpenAI SDK raises on it)."""
    body = {"type": "error", "code": str(status), "message": message, "param": None}
    return f"event: error\ndata: {_dumps(body)}\n\n".encode()
