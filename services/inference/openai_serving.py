"""OpenAI requests served by vLLM's own serving layer over the replica's engine. Imports no gRPC.

vLLM's server (`vllm.entrypoints.openai`) renders chats with the model's template, parses tool calls,
applies structured outputs, and shapes chat and completion bodies, streams, logprobs and n choices. This
module builds that layer exactly as vLLM's server does (its own argument parser and init_app_state, with
the server flags the replica is configured with) over the replica's AsyncLLM, so a request gets the same
answer here as from vLLM's server. Around it: the checks where OpenAI's contract is stricter than vLLM
(unknown fields; tool arguments held to their tool's parameters is a serving flag, see the settings), and
the meter (metering.py) between the serving layer and the engine that counts every prompt and generated token and holds
generation until the caller has reserved tokens for the rendered prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from enum import Enum
from typing import TYPE_CHECKING, Any

from services.inference.metering import EXCHANGE, Exchange, MeteredEngine
from services.runtime import genai
from services.runtime.errors import DomainError, Internal, InvalidArgument, echo

if TYPE_CHECKING:
    from services.inference.engine import Engine

log = logging.getLogger(__name__)


class Endpoint(Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    MESSAGES = "messages"  # Anthropic's Messages API, served by vLLM's own Anthropic layer
    RESPONSES = "responses"  # OpenAI's Responses API, stateless (the router keeps stored responses)
    EMBEDDINGS = "embeddings"  # served by a pooling model's replica


# Each endpoint's gen_ai.operation.name (Messages and Responses are chats).
OPERATIONS = {
    Endpoint.CHAT: genai.CHAT,
    Endpoint.COMPLETIONS: genai.TEXT_COMPLETION,
    Endpoint.MESSAGES: genai.CHAT,
    Endpoint.RESPONSES: genai.CHAT,
    Endpoint.EMBEDDINGS: genai.EMBEDDINGS,
}

# Where vLLM's app state keeps each endpoint's serving object, and the method that answers (None: a call).
HANDLERS = {
    Endpoint.CHAT: ("openai_serving_chat", "create_chat_completion"),
    Endpoint.COMPLETIONS: ("openai_serving_completion", "create_completion"),
    Endpoint.MESSAGES: ("anthropic_serving_messages", "create_messages"),
    Endpoint.RESPONSES: ("openai_serving_responses", "create_responses"),
    Endpoint.EMBEDDINGS: ("serving_embedding", None),
}


# OpenAI fields that have no effect on a self-hosted model: accepted and documented as no-ops.
NO_OP_FIELDS = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})


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
        self._known = {e: _field_names(kind) & NO_OP_FIELDS for e, kind in _request_kinds().items()}
        self._adapters: dict[Endpoint, Any] = {}

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
            *("--max-model-len", str(engine.max_model_len)),
        ]
        parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
        args = parser.parse_args([*argv, *shlex.split(flags)])
        state = State()
        metered: Any = MeteredEngine(engine.llm, engine.count_in_flight)  # the EngineClient it wraps, metered
        # The model's own tasks: generation, or a pooling model's (embed), as vLLM's server asks them.
        await init_app_state(metered, state, args, await engine.llm.get_supported_tasks())
        allowed = {endpoint: _field_names(kind) | NO_OP_FIELDS for endpoint, kind in _request_kinds().items()}
        return cls(state, allowed, engine)

    def _request(self, endpoint: Endpoint, body: bytes, request_id: str, model: str) -> Any:
        from pydantic import TypeAdapter, ValidationError

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
        chars = sum(_strings(fields.get(name)) for name in PROMPT_FIELDS)
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
            if endpoint not in self._adapters:
                self._adapters[endpoint] = TypeAdapter(_request_kinds()[endpoint])
            request = self._adapters[endpoint].validate_python(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise InvalidArgument(f"{where}: {first.get('msg', 'is invalid')}") from exc
        return request

    async def serve(self, endpoint: Endpoint, body: bytes, request_id: str, model: str, exchange: Exchange) -> None:
        """Answers one request into exchange.replies (ending with None); errors go there as exceptions."""
        token = EXCHANGE.set(exchange)
        try:
            await self._serve(endpoint, self._request(endpoint, body, request_id, model), request_id, exchange)
        except BaseException as exc:
            exchange.replies.put_nowait(_domain(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            exchange.replies.put_nowait(None)
        finally:
            EXCHANGE.reset(token)

    async def _serve(self, endpoint: Endpoint, request: Any, request_id: str, exchange: Exchange) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        holder, method = HANDLERS[endpoint]
        handler = getattr(self._state, holder, None)
        if handler is None:  # vLLM builds only what the model's tasks serve (a chat model embeds nothing)
            name = self._engine.config.model_name
            raise InvalidArgument(f"model {echo(name)} does not serve the {endpoint.value} endpoint")
        result = await (getattr(handler, method) if method else handler)(request, None)
        if isinstance(result, ErrorResponse):
            raise _error(result.error.code, result.error.message)
        if isinstance(getattr(result, "body", None), bytes):  # a whole HTTP response (vLLM's pooling layer)
            if result.status_code >= 400:
                message = json.loads(result.body).get("error", {}).get("message", "the request failed")
                raise _error(result.status_code, message)
            exchange.replies.put_nowait(exchange.reply(data=bytes(result.body), finished=True))
            return
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
# Every field a prompt is read from, of any endpoint (what the size check counts before tokenizing).
PROMPT_FIELDS = ("prompt", "messages", "input", "system", "instructions")
# Where an endpoint's prompt is (chat's and Anthropic's: messages).
SOURCES = {Endpoint.COMPLETIONS: "prompt", Endpoint.RESPONSES: "input", Endpoint.EMBEDDINGS: "input"}
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
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return {
        Endpoint.CHAT: ChatCompletionRequest,
        Endpoint.COMPLETIONS: CompletionRequest,
        Endpoint.MESSAGES: AnthropicMessagesRequest,
        Endpoint.RESPONSES: ResponsesRequest,
        Endpoint.EMBEDDINGS: EmbeddingRequest,  # OpenAI's form (input) and vLLM's chat forms (messages)
    }


def _field_names(kind: Any) -> frozenset[str]:
    """The JSON names a request model (or each model of a union of them) reads."""
    members = [kind] if hasattr(kind, "model_fields") else _union_members(kind)
    fields = [f for m in members for f in m.model_fields.items()]
    return frozenset(name for name, _ in fields) | {f.alias for _, f in fields if f.alias}


def _union_members(kind: Any) -> list[Any]:
    from typing import get_args

    union = get_args(kind)[0]  # Annotated[A | B | ..., validator]
    return [m for m in get_args(union) if hasattr(m, "model_fields")]


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
