"""OpenAI requests served by vLLM's own serving layer over the replica's engine. Imports no gRPC.

vLLM's server (`vllm.entrypoints.openai`) renders chats with the model's template, parses tool calls,
applies structured outputs, and shapes chat and completion bodies, streams, logprobs and n choices. This
module builds that layer exactly as vLLM's server does (its own argument parser and init_app_state, with
the server flags the replica is configured with) over the replica's AsyncLLM, so a request gets the same
answer here as from vLLM's server. Around it: the checks where OpenAI's contract is stricter than vLLM
(unknown fields; tool arguments held to their tool's parameters is a serving flag, see the settings), and
a meter between the serving layer and the engine that counts every prompt and generated token and holds
generation until the caller has reserved tokens for the rendered prompt.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import shlex
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from services.runtime import tracing
from services.runtime.errors import DomainError, Internal, InvalidArgument, Unavailable, echo

if TYPE_CHECKING:
    from services.inference.engine import Engine

log = logging.getLogger(__name__)


class Endpoint(Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    MESSAGES = "messages"  # Anthropic's Messages API, served by vLLM's own Anthropic layer
    RESPONSES = "responses"  # OpenAI's Responses API, stateless (the router keeps stored responses)


# OpenAI fields that have no effect on a self-hosted model: accepted and documented as no-ops.
NO_OP_FIELDS = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})


@dataclass
class Reply:
    """One message for the caller: the body or an SSE event, and the token counts so far."""

    data: bytes = b""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    measured: bool = False
    max_tokens: int = 0
    failed: bool = False


@dataclass
class Exchange:
    """One request between the caller and the engine: its counts, and the gate generation waits at."""

    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    replies: asyncio.Queue[Reply | BaseException | None] = field(default_factory=asyncio.Queue)
    prompt_tokens: int = 0
    max_tokens: int = 0
    completion_tokens: int = 0
    measured: bool = False
    # A go-ahead on condition (the most prompt tokens and generated tokens it covers), until measured.
    covered: tuple[int, int] | None = None

    def reply(self, **fields: Any) -> Reply:
        return Reply(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, **fields)

    def go_ahead(self, prompt_tokens: int = 0, max_tokens: int = 0) -> None:
        """The caller's go-ahead: whatever is measured (prompt_tokens 0), or only within those counts."""
        if prompt_tokens == 0:
            self.proceed.set()
            return
        self.covered = (prompt_tokens, max_tokens)
        self.release_if_covered()

    def release_if_covered(self) -> None:
        if self.covered is not None and self.measured:
            prompt_tokens, max_tokens = self.covered
            if self.prompt_tokens <= prompt_tokens and self.max_tokens <= max_tokens:
                self.proceed.set()


_EXCHANGE: contextvars.ContextVar[Exchange] = contextvars.ContextVar("meshserve_exchange")


def _prompt_len(prompt: Any) -> int:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    return len(ids) if ids is not None else 0


class MeteredEngine:
    """The engine as vLLM's serving layer sees it: generation metered, and gated on the caller's go-ahead."""

    def __init__(self, llm: Any, on_generate: Callable[[int], None] | None = None) -> None:
        self._llm = llm
        self._on_generate = on_generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        exchange = _EXCHANGE.get(None)
        if exchange is None:  # a call of vLLM's own (none today): unmetered
            return self._llm.generate(prompt, sampling_params, request_id, *args, **kwargs)
        exchange.prompt_tokens += _prompt_len(prompt)
        exchange.max_tokens += (sampling_params.max_tokens or 0) * max(1, getattr(sampling_params, "n", 1) or 1)
        return self._metered(exchange, prompt, sampling_params, request_id, args, kwargs)

    async def _metered(
        self, exchange: Exchange, prompt: Any, params: Any, request_id: str, args: Any, kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        # Every generate call of a request is made before the first is iterated: the counts are whole here.
        if not exchange.measured:
            exchange.measured = True
            exchange.replies.put_nowait(exchange.reply(measured=True, max_tokens=exchange.max_tokens))
            exchange.release_if_covered()  # a go-ahead on condition may have come before the measurement
        await exchange.proceed.wait()
        kind = getattr(params, "output_kind", None)
        # A whole reply is asked of the engine step by step, as a stream is, and merged here with vLLM's own
        # RequestOutput.add: the caller then sees every token as it comes (time to first token, gaps
        # between tokens) and vLLM's layer still gets the one final output it asked for.
        whole = kind == RequestOutputKind.FINAL_ONLY
        if whole:
            params = params.clone()
            params.output_kind = RequestOutputKind.DELTA
        delta = whole or kind == RequestOutputKind.DELTA
        seen: dict[int, int] = {}
        merged: Any = None
        finished = False
        if self._on_generate is not None:
            self._on_generate(1)
        span = tracing.start_span("engine.generate", {"meshserve.prompt_tokens": _prompt_len(prompt)})
        try:
            async for output in self._llm.generate(prompt, params, request_id, *args, **kwargs):
                if not seen:
                    span.add_event("first_token")
                for choice in output.outputs:
                    count = len(choice.token_ids)
                    before = seen.get(choice.index, 0)
                    now = before + count if delta else count
                    seen[choice.index] = now
                    exchange.completion_tokens += now - before
                finished = bool(output.finished)
                if not whole:
                    yield output
                    continue
                exchange.replies.put_nowait(exchange.reply())  # progress: the counts, no data
                if merged is None:
                    merged = output
                else:
                    merged.add(output, aggregate=True)
            if merged is not None:
                merged.outputs.sort(key=lambda o: o.index)
                yield merged
        except EngineDeadError as exc:  # the replica is down, not this request at fault
            raise Unavailable(f"the engine died: {exc}") from exc
        finally:
            completion_tokens = sum(seen.values())
            span.set_attribute("meshserve.completion_tokens", completion_tokens)
            span.set_attribute("meshserve.finished", finished)
            span.end()
            if self._on_generate is not None:
                self._on_generate(-1)
            if not finished:
                # AsyncLLM aborts a generation whose iterator closes early; said here, as Engine.generate says it.
                log.info("aborted", extra={"request_id": request_id, "completion_tokens": completion_tokens})


def _strings(value: Any) -> int:
    """Characters in every string of a JSON value (what tokenizing it would read)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_strings(v) for v in value)
    if isinstance(value, dict):
        return sum(_strings(v) for v in value.values())
    return 0


class ServingLayer:
    """vLLM's OpenAI serving for chat and completions, over one engine."""

    def __init__(self, state: Any, allowed: dict[Endpoint, frozenset[str]], engine: Engine) -> None:
        self._state = state
        self._allowed = allowed
        self._engine = engine
        # The no-op fields an endpoint's own request model knows (the Responses API's store and metadata).
        self._known = {e: frozenset(kind.model_fields) & NO_OP_FIELDS for e, kind in _request_kinds().items()}

    @classmethod
    async def start(cls, engine: Engine, flags: str) -> ServingLayer:
        """Builds the layer as vLLM's server does, with its server flags (e.g. the model's tool parser)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        config = engine.config
        argv = [
            *("--model", str(config.model_dir), "--served-model-name", config.model_name),
            *("--max-model-len", str(config.max_model_len)),
        ]
        parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
        args = parser.parse_args([*argv, *shlex.split(flags)])
        state = State()
        metered: Any = MeteredEngine(engine.llm, engine.count_in_flight)  # the EngineClient it wraps, metered
        await init_app_state(metered, state, args, ("generate",))

        def names(model: Any) -> frozenset[str]:
            fields = model.model_fields
            return frozenset(fields) | {f.alias for f in fields.values() if f.alias} | NO_OP_FIELDS

        allowed = {endpoint: names(kind) for endpoint, kind in _request_kinds().items()}
        return cls(state, allowed, engine)

    def _request(self, endpoint: Endpoint, body: bytes, request_id: str, model: str) -> Any:
        from pydantic import ValidationError

        try:
            fields = json.loads(body)
        except ValueError as exc:
            raise InvalidArgument(f"the body is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise InvalidArgument("the body must be a JSON object")
        unknown = sorted(set(fields) - self._allowed[endpoint])
        if unknown:
            raise InvalidArgument(f"Unrecognized request argument supplied: {echo(unknown[0])}")
        if "request_id" in fields:
            raise InvalidArgument("request_id: is set by meshserve (it names the request in billing and the logs)")
        source = SOURCES.get(endpoint, "messages")
        value = fields.get(source)
        # Before tokenizing: megabytes of text take seconds in which this replica serves nobody else.
        chars = _strings(value) + _strings(fields.get("system")) + _strings(fields.get("instructions"))
        self._engine.refuse_oversized(source, chars, len(value) if isinstance(value, list) else 1)
        for name in NO_OP_FIELDS - self._known[endpoint]:
            fields.pop(name, None)
        fields["model"] = model
        if endpoint is Endpoint.RESPONSES:  # the response's id is the request's, as vLLM names it
            fields["request_id"] = f"{RESPONSE_ID_PREFIX}{request_id}"
            fields["store"] = False  # stored by the router (services/router/responses.py), never here
        elif endpoint is not Endpoint.MESSAGES:  # vLLM's Anthropic layer names its chat request itself
            fields["request_id"] = request_id
        try:
            request = _request_kinds()[endpoint].model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise InvalidArgument(f"{where}: {first.get('msg', 'is invalid')}") from exc
        return request

    async def serve(self, endpoint: Endpoint, body: bytes, request_id: str, model: str, exchange: Exchange) -> None:
        """Answers one request into exchange.replies (ending with None); errors go there as exceptions."""
        token = _EXCHANGE.set(exchange)
        try:
            await self._serve(endpoint, self._request(endpoint, body, request_id, model), request_id, exchange)
        except BaseException as exc:
            exchange.replies.put_nowait(_domain(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            exchange.replies.put_nowait(None)
        finally:
            _EXCHANGE.reset(token)

    async def _serve(self, endpoint: Endpoint, request: Any, request_id: str, exchange: Exchange) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        state = self._state
        if endpoint is Endpoint.CHAT:
            result = await state.openai_serving_chat.create_chat_completion(request, None)
        elif endpoint is Endpoint.COMPLETIONS:
            result = await state.openai_serving_completion.create_completion(request, None)
        elif endpoint is Endpoint.MESSAGES:
            result = await state.anthropic_serving_messages.create_messages(request, None)
        else:
            result = await state.openai_serving_responses.create_responses(request, None)
        if isinstance(result, ErrorResponse):
            raise _error(result.error.code, result.error.message)
        anthropic = endpoint is Endpoint.MESSAGES
        if hasattr(result, "model_dump_json"):
            if anthropic:  # Anthropic's message ids, and vLLM's server leaves out what is null
                result.id = f"{MESSAGE_ID_PREFIX}{request_id}"
            data = result.model_dump_json(exclude_none=anthropic, by_alias=endpoint is Endpoint.RESPONSES).encode()
            exchange.replies.put_nowait(exchange.reply(data=data, finished=True))
            return
        failed, first = False, True
        errors, done = STREAM_ENDS.get(endpoint, (('data: {"error"',), "data: [DONE]"))
        async for item in result:
            event = item if isinstance(item, str) else _sse(item)
            if anthropic and first:
                event = _named_message(event, f"{MESSAGE_ID_PREFIX}{request_id}")
            first = False
            failed = failed or event.startswith(errors)
            exchange.replies.put_nowait(
                exchange.reply(data=event.encode(), finished=event.startswith(done) and not failed, failed=failed)
            )


# Anthropic's message ids: msg_ and the request's id (vLLM's Anthropic layer says chatcmpl-<its own id>).
MESSAGE_ID_PREFIX = "msg_"
RESPONSE_ID_PREFIX = "resp_"
# Where an endpoint's prompt is (chat's and Anthropic's: messages).
SOURCES = {Endpoint.COMPLETIONS: "prompt", Endpoint.RESPONSES: "input"}
# The events that fail a stream, and the one that ends it whole, where they are not OpenAI chat's.
STREAM_ENDS = {
    Endpoint.MESSAGES: (("event: error",), "event: message_stop"),
    Endpoint.RESPONSES: (("event: error", "event: response.failed"), "event: response.completed"),
}


def _sse(event: Any) -> str:
    """A Responses API event as vLLM's server sends it: named by its type."""
    return f"event: {event.type}\ndata: {event.model_dump_json(by_alias=True)}\n\n"


def _named_message(event: str, message_id: str) -> str:
    """A message_start event with the message's id set (the one event of a stream that carries it)."""
    head, sep, data = event.partition("data: ")
    if head != "event: message_start\n" or not sep:
        return event
    fields = json.loads(data)
    fields["message"]["id"] = message_id
    return f"{head}{sep}{json.dumps(fields, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _request_kinds() -> dict[Endpoint, Any]:
    """vLLM's request model of each endpoint."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return {
        Endpoint.CHAT: ChatCompletionRequest,
        Endpoint.COMPLETIONS: CompletionRequest,
        Endpoint.MESSAGES: AnthropicMessagesRequest,
        Endpoint.RESPONSES: ResponsesRequest,
    }


def _error(status: int, message: str) -> Exception:
    # A request vLLM refuses is the caller's (4xx, 501 for a feature this model lacks); never a fault of the
    # replica, which keeps serving everyone else.
    if 400 <= status < 500 or status == 501:
        return InvalidArgument(message)
    return Internal(f"the engine failed on this request: {message}")


def _domain(exc: BaseException) -> BaseException:
    from vllm.exceptions import VLLMValidationError

    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, VLLMValidationError | ValueError | TypeError | NotImplementedError | OverflowError):
        return InvalidArgument(str(exc) or type(exc).__name__)
    return exc
