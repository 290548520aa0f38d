"""External OpenAI-compatible providers as backends of a model: the upstream call through the official openai
SDK's async client, its answer relayed as the engine's replies are (SSE events or a whole body), and usage
taken from the provider's own counts. Imports no gRPC.

The client's request body is what goes upstream (with the provider's name for the model); the client's
authorization never does, and the provider's key is read from where the catalogue says (an environment
variable or a mounted Secret), never written to a log, a trace or an error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import openai

from meshserve.inference.v1 import inference_pb2
from services.router.accounting import Allowance
from services.router.balancer import LoadReport, ReplicaState
from services.router.catalogue import ProviderConfig, ProviderRoute
from services.runtime.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    QuotaExceeded,
    Unavailable,
    bounded,
)

log = logging.getLogger(__name__)

CHAT = inference_pb2.ENDPOINT_CHAT_COMPLETIONS
COMPLETIONS = inference_pb2.ENDPOINT_COMPLETIONS
DONE = b"data: [DONE]\n\n"
# Statuses of a provider that say it cannot serve now (or meshserve's configuration of it is wrong): the
# next backend is tried, as when a replica fails before its first token. Any other 4xx is about the request.
_PROVIDER_DOWN = {401, 403, 404, 408, 409, 429}
ADDRESS_PREFIX = "provider:"


def address(route: ProviderRoute) -> str:
    """How a provider backend is named where replicas are named (metrics, logs, failover)."""
    return f"{ADDRESS_PREFIX}{route.provider}/{route.model}"


def backend_of(replica_address: str) -> str:
    """What billing and metrics call the backend of a replica address: local, or the provider's name."""
    if replica_address.startswith(ADDRESS_PREFIX):
        return replica_address.removeprefix(ADDRESS_PREFIX).split("/", 1)[0]
    return "local"


def api_key(config: ProviderConfig) -> str:
    """The provider's key from its variable or file; Unavailable (naming where, never the value) if absent."""
    if config.api_key_env:
        key = os.environ.get(config.api_key_env, "")
        where = f"environment variable {config.api_key_env}"
    else:
        try:
            key = Path(config.api_key_file).read_text().strip()
        except OSError:
            key = ""
        where = f"file {config.api_key_file}"
    if not key:
        raise Unavailable(f"provider {config.name} has no API key: {where} is unset or empty")
    return key


def _error(exc: Exception, provider: str) -> DomainError:
    """The domain error of a failed upstream call: Unavailable where another backend should be tried."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500 or status in _PROVIDER_DOWN:
            return Unavailable(f"provider {provider} answered {status}")
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        return InvalidArgument(f"provider {provider} refused the request ({status}): {bounded(str(message or exc))}")
    if isinstance(exc, openai.APITimeoutError):
        return Unavailable(f"provider {provider} did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return Unavailable(f"provider {provider} cannot be reached")
    if isinstance(exc, openai.APIError):  # an error event in its stream
        return Unavailable(f"provider {provider} failed: {bounded(exc.message)}")
    if isinstance(exc, DomainError):
        return exc
    return Unavailable(f"provider {provider} failed: {type(exc).__name__}")


def _finish(choices: list[dict[str, Any]]) -> inference_pb2.FinishReason:
    reasons = {c.get("finish_reason") for c in choices}
    return inference_pb2.FINISH_REASON_LENGTH if "length" in reasons else inference_pb2.FINISH_REASON_STOP


def _maxima(fields: dict[str, Any], endpoint: int, default: int) -> tuple[str, int, int]:
    """(the field that bounds each choice's tokens, its value, the number of choices): the request's, or
    the provider's default set on it."""
    name = "max_completion_tokens" if endpoint == CHAT and "max_completion_tokens" in fields else "max_tokens"
    most = fields.get(name)
    if not isinstance(most, int) or isinstance(most, bool):
        most = fields[name] = default
    choices = fields.get("n")
    return name, most, choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 else 1


class ProviderBackend:
    """One model at one provider, called as a replica is (serve), with a state the failover ejects."""

    def __init__(self, config: ProviderConfig, route: ProviderRoute, client: Callable[[], openai.AsyncOpenAI]) -> None:
        self.config = config
        self.route = route
        self.address = address(route)
        self._client = client
        self.state = ReplicaState(self.address)
        self.state.reported(LoadReport(capacity=config.max_concurrency))

    async def serve(
        self,
        start: inference_pb2.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
        allowance: Allowance | None = None,
        whole: bool = False,
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        """The provider's answer as the engine's replies: tokens reserved first (the prompt estimated from the
        body's size, generation bounded by the request's maximum or the provider's), then the upstream call."""
        if start.endpoint not in (CHAT, COMPLETIONS):
            raise InvalidArgument(f"provider {self.config.name} serves chat and completions only")
        fields = json.loads(start.body)
        client_model = fields.get("model", start.model)
        stream = bool(fields.get("stream"))
        name, most, choices = _maxima(fields, start.endpoint, self.config.max_tokens)
        estimate = len(start.body) // 4 + 1
        if reserve is not None:
            await reserve(estimate, most * choices)
        stopped_at = 0
        if allowance is not None and allowance.tokens is not None:
            if allowance.tokens < choices:
                raise QuotaExceeded("spend budget exhausted: no budget has room for a completion token")
            if allowance.tokens < most * choices:
                stopped_at = fields[name] = allowance.tokens // choices
        fields["model"] = self.route.model
        if stream:
            options = fields.get("stream_options") or {}
            wanted = bool(options.get("include_usage"))
            fields["stream_options"] = {**options, "include_usage": True}
            replies = self._stream(start.endpoint, fields, client_model, wanted, estimate)
        else:
            replies = self._whole(start.endpoint, fields, client_model)
        # aclosing: a client gone away closes the upstream call now, not when the generator is collected.
        async with aclosing(replies):
            async for reply in replies:
                if stopped_at and reply.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
                    reply.stopped_at_allowance = True
                yield reply

    async def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The typed v1 API is the engine's own: a provider answers the OpenAI-compatible API only."""
        raise FailedPrecondition(self._v1_refusal())
        yield  # an async generator, as a replica's

    async def count_tokens(self, request: inference_pb2.GenerateRequest) -> tuple[int, int]:
        raise FailedPrecondition(self._v1_refusal())

    def _v1_refusal(self) -> str:
        return (
            f"this request went to provider {self.config.name}, which answers the OpenAI-compatible API only "
            "(/v1/chat/completions, /v1/completions, meshserve.llm.v2), not meshserve.llm.v1"
        )

    def _create(self, endpoint: int, fields: dict[str, Any]) -> Any:
        """The SDK's create for the endpoint, every field passed as the client sent it (extra_body: vLLM's
        extensions and fields newer than the SDK go through unchanged)."""
        body = dict(fields)
        model, stream = body.pop("model"), bool(body.pop("stream", False))
        timeout = self.config.timeout_seconds
        client = self._client()
        if endpoint == CHAT:
            messages = body.pop("messages")
            return client.chat.completions.create(
                model=model, messages=messages, stream=stream, extra_body=body, timeout=timeout
            )
        prompt = body.pop("prompt")
        return client.completions.create(model=model, prompt=prompt, stream=stream, extra_body=body, timeout=timeout)

    async def _whole(
        self, endpoint: int, fields: dict[str, Any], client_model: str
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        try:
            answer = await self._create(endpoint, fields)
        except Exception as exc:
            raise _error(exc, self.config.name) from None
        body = answer.model_dump(mode="json", exclude_unset=True)
        body["model"] = client_model
        usage = answer.usage
        if usage is None:
            raise Unavailable(f"provider {self.config.name} answered without usage")
        yield inference_pb2.ServeResponse(
            data=json.dumps(body).encode(),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            finish_reason=_finish(body.get("choices", [])),
        )

    async def _stream(
        self, endpoint: int, fields: dict[str, Any], client_model: str, wanted: bool, estimate: int
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        """Chunks relayed as they arrive; the usage chunk the provider sends last is relayed only where the
        client asked for it; [DONE] last, with the provider's counts."""
        try:
            chunks = await self._create(endpoint, fields)
        except Exception as exc:
            raise _error(exc, self.config.name) from None
        prompt_tokens, completion_tokens, finish, counted = estimate, 0, inference_pb2.FINISH_REASON_STOP, False
        try:
            async for chunk in chunks:
                body = chunk.model_dump(mode="json", exclude_unset=True)
                body["model"] = client_model
                usage = body.get("usage") if wanted else body.pop("usage", None)
                if usage:
                    prompt_tokens, completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    counted = True
                choices = body.get("choices") or []
                if any(c.get("finish_reason") for c in choices):
                    finish = _finish(choices)
                if not choices and not wanted:
                    continue  # the usage chunk the client did not ask for
                completion_tokens += 0 if counted else len(choices)
                yield inference_pb2.ServeResponse(
                    data=f"data: {json.dumps(body)}\n\n".encode(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
        except Exception as exc:
            raise _error(exc, self.config.name) from None
        finally:
            await chunks.close()
        if not counted:
            log.warning("provider streamed no usage: tokens counted from its chunks", extra={"backend": self.address})
        yield inference_pb2.ServeResponse(
            data=DONE,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
        )


def _new_client(config: ProviderConfig, key: str) -> openai.AsyncOpenAI:
    # No retries of the SDK's own: a failure goes to the next backend, as the router decides.
    return openai.AsyncOpenAI(base_url=config.base_url, api_key=key, max_retries=0)


class Providers:
    """The provider backends the catalogue names: one per provider and model (its routing state kept while the
    provider's configuration stays the same), one openai client per provider and key."""

    def __init__(
        self,
        providers: Callable[[], Mapping[str, ProviderConfig]] | None = None,
        client: Callable[[ProviderConfig, str], openai.AsyncOpenAI] | None = None,
    ) -> None:
        self._providers: Callable[[], Mapping[str, ProviderConfig]] = providers or dict
        self._new_client = client or _new_client
        # By provider name: the configuration and key its client was made with. A client replaced (the
        # catalogue changed it, or its Secret was rotated) is dropped, not closed: calls still on it finish.
        self._clients: dict[str, tuple[ProviderConfig, str, openai.AsyncOpenAI]] = {}
        self._backends: dict[str, ProviderBackend] = {}

    def backend(self, route: ProviderRoute) -> ProviderBackend:
        """The backend of a route."""
        config = self._providers().get(route.provider)
        if config is None:
            raise Unavailable(f"provider {route.provider} is not in the catalogue")
        named = address(route)
        backend = self._backends.get(named)
        if backend is None or backend.config != config:
            client = functools.partial(self._client, route.provider, config)
            backend = self._backends[named] = ProviderBackend(config, route, client)
        return backend

    def _client(self, name: str, config: ProviderConfig) -> openai.AsyncOpenAI:
        key = api_key(config)  # read on every call: a rotated Secret takes effect on the next request
        kept = self._clients.get(name)
        if kept is None or kept[:2] != (config, key):
            kept = self._clients[name] = (config, key, self._new_client(config, key))
        return kept[2]

    async def close(self) -> None:
        for _, _, client in self._clients.values():
            await client.close()
