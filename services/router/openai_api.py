"""The OpenAI chat, completions and Responses API and Anthropic's Messages (meshserve.llm.v2): the client's JSON checked
against its contract, routed and metered by the pipeline, answered by vLLM's serving layer on a replica.
Imports no gRPC.

The replica validates everything vLLM knows (its request models) and refuses unknown fields; the router
refuses, before any token is reserved, what OpenAI's contract forbids and vLLM would accept (non-finite
numbers, values out of OpenAI's ranges), so that a bad request costs the mesh one JSON parse.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from meshserve.inference.v1 import inference_pb2
from services.router import access, cache, embeddings, responses
from services.router import messages as anthropic
from services.router.accounting import Metered, Window
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Version
from services.router.estimates import PromptEstimator, most_generated
from services.router.failover import Attempt, Replica, opening, prefix_key
from services.router.pipeline import FINISHED, Pipeline, Reserve
from services.router.validation import MAX_STOP, finite, in_range, number
from services.runtime.errors import DomainError, Internal, InvalidArgument, Unavailable, bounded, echo
from services.runtime.genai import CHAT as CHAT_OPERATION
from services.runtime.genai import EMBEDDINGS as EMBEDDINGS_OPERATION
from services.runtime.genai import TEXT_COMPLETION
from services.runtime.openai_errors import error_body

log = logging.getLogger(__name__)

CHAT = inference_pb2.ENDPOINT_CHAT_COMPLETIONS
COMPLETIONS = inference_pb2.ENDPOINT_COMPLETIONS
MESSAGES = inference_pb2.ENDPOINT_MESSAGES  # Anthropic's Messages API (services/router/messages.py)
RESPONSES = inference_pb2.ENDPOINT_RESPONSES  # OpenAI's Responses API (services/router/responses.py)
EMBEDDINGS = inference_pb2.ENDPOINT_EMBEDDINGS  # an embedding model's (services/router/embeddings.py)
ID_PREFIX: dict[int, str] = {
    CHAT: "chatcmpl-",
    COMPLETIONS: "cmpl-",
    MESSAGES: "msg_",
    RESPONSES: responses.ID_PREFIX,
    EMBEDDINGS: "embd-",
}

# The GenAI semantic conventions' operation of each endpoint (chat's for Messages and Responses).
OPERATIONS: dict[int, str] = {COMPLETIONS: TEXT_COMPLETION, EMBEDDINGS: EMBEDDINGS_OPERATION}

# OpenAI's ranges, where vLLM accepts more: (low, high, low excluded).
RANGES = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 2.0, True),
}
AT_LEAST_ONE = ("max_tokens", "max_completion_tokens", "n")
# OpenAI's roles (vLLM takes any role a chat template might know).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DONE = b"data: [DONE]\n\n"
# Why a generation ended early where it was not the model or max_tokens: a whole reply's response header, and
# an SSE comment (which clients skip) before a stream's last event; finish_reason says "length" either way.
STOPPED_HEADER, STOPPED_AT_BUDGET = "x-meshserve-stopped", "spend-budget"
STOPPED_EVENT = b": meshserve stopped this generation: its spend budget has no room for more tokens\n\n"


@dataclass
class ResponseMeta:
    """What a response's headers say, known once the request is counted and its tokens reserved: before its
    first byte."""

    windows: tuple[Window, ...] = ()
    # The generation was stopped where its spend budgets had no room for more (a whole reply's header).
    stopped: bool = False
    # hit or miss, where the model's answers are cached (services/router/cache.py); empty: not cached.
    cache: str = ""

    def headers(self) -> tuple[tuple[str, str], ...]:
        stopped = ((STOPPED_HEADER, STOPPED_AT_BUDGET),) if self.stopped else ()
        cached = ((cache.HEADER, self.cache),) if self.cache else ()
        return tuple(header for window in self.windows for header in window.headers()) + stopped + cached


@dataclass(frozen=True)
class Body:
    """A request body as the router needs it: the JSON to pass on, the model, the prompt's opening."""

    data: bytes
    model: str
    opening: str
    # The most tokens it may generate over every choice, where the body says (estimates.most_generated).
    most_generated: int | None = None
    # The body's fields as parsed (the response cache keys on them).
    fields: dict[str, Any] = field(default_factory=dict, compare=False)


def _contract(fields: dict[str, Any]) -> None:
    """OpenAI's rules that vLLM does not enforce."""
    finite(fields)
    for name, (low, high, low_open) in RANGES.items():
        in_range(name, number(fields, name), low, high, low_open)
    for name in AT_LEAST_ONE:
        value = number(fields, name)
        if value is not None and value < 1:
            raise InvalidArgument(f"{name}: must be at least 1, got {value:g}")
    messages = fields.get("messages", [])
    if not isinstance(messages, list):
        raise InvalidArgument("messages: must be a list of messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {echo(role)}")
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        if not (content is None or isinstance(content, str | list)) or not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts
        ):
            raise InvalidArgument(f"messages[{i}].content: must be a string or a list of content parts")
    stop = fields.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise InvalidArgument(f"stop: at most {MAX_STOP} stop strings, got {len(stop)}")


def _opening(endpoint: int, fields: dict[str, Any], prefix_chars: int) -> str:
    if endpoint == EMBEDDINGS:  # no conversation goes on: nothing to keep near a replica's prefix cache
        return ""
    if endpoint == RESPONSES:
        return opening(responses.turns(fields), prefix_chars)
    if endpoint != COMPLETIONS:  # chat's messages and Anthropic's read alike (and Anthropic's system first)
        return opening(anthropic.turns(fields), prefix_chars)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


def parse(endpoint: int, data: bytes, stream: bool, prefix_chars: int) -> Body:
    """Checks a body against OpenAI's contract; the stream flag is the method's (the edge routes by it)."""

    def constant(raw: str) -> float:
        return float(raw)  # NaN and Infinity are not JSON: kept, then refused with the field's name

    try:
        fields = json.loads(data.decode("utf-8"), parse_constant=constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the body is not valid JSON: {bounded(str(exc))}") from exc
    if not isinstance(fields, dict):
        raise InvalidArgument("the body must be a JSON object")
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model: is required (a string)")
    if "stream" in fields and not isinstance(fields["stream"], bool | None):
        raise InvalidArgument("stream: must be a boolean")
    if endpoint == MESSAGES:
        anthropic.contract(fields)
    elif endpoint == RESPONSES:
        responses.contract(fields)
    elif endpoint == EMBEDDINGS:
        embeddings.contract(fields)
    else:
        _contract(fields)
    if endpoint == CHAT and not fields.get("messages"):
        raise InvalidArgument("messages: must contain at least one message")
    if bool(fields.get("stream")) != stream:
        fields["stream"] = stream
        data = json.dumps(fields).encode()
    generated = 0 if endpoint == EMBEDDINGS else most_generated(endpoint != COMPLETIONS, fields)
    return Body(data, model, _opening(endpoint, fields, prefix_chars), generated, fields)


def error_event(endpoint: int, exc: BaseException) -> bytes:
    """An error after a stream began, in-band as vLLM and OpenAI send it; the OpenAI SDK raises on it."""
    if endpoint == MESSAGES:
        return anthropic.error_event(exc)
    detail = exc if isinstance(exc, DomainError) else Internal("internal error while generating")
    if endpoint == RESPONSES:
        return responses.error_event(detail.http_status, bounded(str(detail)))
    body = error_body(detail.http_status, bounded(str(detail)), detail.error_type)
    return f"data: {json.dumps(body)}\n\n".encode() + DONE


def _noting(
    reserve: Reserve | None, meta: ResponseMeta, learn: Callable[[int], None]
) -> Callable[[int, int], Awaitable[None]] | None:
    """reserve, noting in meta the windows it leaves (for the response's headers), and teaching the
    measured prompt to the estimator."""
    if reserve is None:
        return None

    async def noted(prompt_tokens: int, max_tokens: int) -> None:
        learn(prompt_tokens)
        meta.windows = await reserve(prompt_tokens, max_tokens)

    return noted


class OpenAIApi:
    """Chat and completions as OpenAI's API, over the pipeline."""

    def __init__(
        self,
        pipeline: Pipeline,
        reserve_on_guess: bool = False,
        store: responses.ResponseStore | None = None,
        answers: cache.ResponseCache | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._estimator = PromptEstimator()
        self._reserve_on_guess = reserve_on_guess
        self._store = store or responses.ResponseStore(None, 0)
        self._cache = answers

    async def get_response(self, response_id: str, caller: Caller) -> bytes:
        """A stored response of the caller's tenant (GET /v1/responses/{id})."""
        return await self._store.get(caller.tenant, response_id)

    def _body(self, endpoint: int, data: bytes, stream: bool, hints: RouteHints) -> Body:
        body = parse(endpoint, data, stream, self._pipeline.policy.prefix_chars)
        if hints.edge_model is not None and hints.edge_model != body.model:
            # The edge limited the request by the model it read; the body must not name another.
            raise InvalidArgument(f"model: the edge read {echo(hints.edge_model)}, the body names {echo(body.model)}")
        entry = access.CURRENT.get()
        if entry is not None:
            entry.model = body.model
        return body

    def _plan(
        self, endpoint: int, body: Body, stream: bool, caller: Caller, hints: RouteHints, meta: ResponseMeta
    ) -> tuple[cache.Plan | None, RouteHints]:
        """What the response cache does for a request (None: nothing), and its hints with the version it goes
        to pinned (the version is part of the cache's key). A request refused by its model or its key goes
        the pipeline's way, to hear why in the pipeline's order."""
        if self._cache is None or endpoint not in (CHAT, COMPLETIONS):
            return None, hints
        try:
            entry, version = self._pipeline.route(body.model, caller, hints)
        except DomainError:
            return None, hints
        if entry.cache == "off":
            return None, hints
        meta.cache = cache.MISS
        read, keep = cache.directive(hints.cache_control)
        if not cache.deterministic(body.fields) or not (read or keep):
            return None, hints
        owner = "*" if entry.cache == "shared" else caller.tenant
        key = cache.key_of(body.model, owner, version.name, endpoint, stream, body.fields)
        return cache.Plan(key, body.model, read, keep), replace(hints, version=version.name)

    async def _cached(
        self, endpoint: int, plan: cache.Plan | None, caller: Caller, hints: RouteHints, meta: ResponseMeta
    ) -> tuple[bytes, ...] | None:
        """A kept answer's events under a new request id, counted and recorded as the pipeline does; None on
        a miss."""
        if self._cache is None or plan is None or not plan.read:
            return None
        answer = await self._cache.get(plan)
        if answer is None:
            return None
        request_id = f"{ID_PREFIX[endpoint]}{uuid.uuid4().hex}"
        _, version = self._pipeline.route(plan.model, caller, hints)
        told = (answer.prompt_tokens, answer.completion_tokens)
        meta.windows = await self._pipeline.cached(request_id, plan.model, caller, version, *told)
        meta.cache = cache.HIT
        return answer.replayed(request_id)

    def _replies(
        self, endpoint: int, body: Body, stream: bool, caller: Caller, hints: RouteHints, meta: ResponseMeta
    ) -> tuple[str, AsyncGenerator[inference_pb2.ServeResponse, None]]:
        pipeline = self._pipeline
        request_id = f"{ID_PREFIX[endpoint]}{uuid.uuid4().hex}"

        estimator, size = self._estimator, len(body.data)
        guess = estimator.guess(body.model, endpoint, size, body.most_generated) if self._reserve_on_guess else None

        def learn(prompt_tokens: int) -> None:
            estimator.learn(body.model, endpoint, size, prompt_tokens)

        def attempt(metered: Metered, version: Version) -> Attempt[inference_pb2.ServeResponse]:
            def replies(replica: Replica) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
                reserve = _noting(pipeline.reserver(request_id, caller, body.model, metered), meta, learn)
                start = inference_pb2.ServeStart(
                    request_id=request_id.removeprefix(ID_PREFIX[endpoint]),
                    model=body.model,
                    endpoint=endpoint,  # type: ignore[arg-type]
                    body=body.data,
                )
                cover = (
                    functools.partial(pipeline.covered, metered) if reserve is not None and guess is not None else None
                )
                # A reservation still on its way to Redis is not waited for: the replica renders meanwhile.
                whole = metered.unary and pipeline.landed(metered)
                return replica.serve(start, reserve, cover, metered.allowance, whole)

            return replies

        key = prefix_key(body.opening, hints, pipeline.policy.prefix_chars)
        operation = OPERATIONS.get(endpoint, CHAT_OPERATION)
        replies = pipeline.generate(request_id, body.model, key, caller, hints, attempt, not stream, guess, operation)
        return request_id, replies

    def _keep(
        self, plan: cache.Plan | None, request_id: str, events: tuple[bytes, ...], last: Any, meta: ResponseMeta
    ) -> None:
        """Keeps an answer whose last reply finished it (stop or length; not failed, not stopped at a spend
        budget) in the cache."""
        if self._cache is None or plan is None or meta.stopped or last.failed or last.finish_reason not in FINISHED:
            return
        self._cache.keep(plan, cache.Answer(request_id, events, last.prompt_tokens, last.completion_tokens))

    async def whole(self, endpoint: int, data: bytes, caller: Caller, hints: RouteHints, meta: ResponseMeta) -> bytes:
        """A whole response body."""
        turn = await self._store.turn(caller.tenant, data) if endpoint == RESPONSES else None
        body = self._body(endpoint, data if turn is None else turn.data, False, hints)
        plan, hints = self._plan(endpoint, body, False, caller, hints, meta)
        if (kept := await self._cached(endpoint, plan, caller, hints, meta)) is not None:
            return kept[0]
        request_id, replies = self._replies(endpoint, body, False, caller, hints, meta)
        out, last = b"", None
        async with aclosing(replies):
            async for reply in replies:
                out += reply.data
                meta.stopped = meta.stopped or reply.stopped_at_allowance
                last = reply
        if not out or last is None:
            raise Unavailable("the engine ended the request without answering")
        self._keep(plan, request_id, (out,), last, meta)
        return out if turn is None else await responses.finish_whole(self._store, turn, out)

    async def stream(
        self, endpoint: int, data: bytes, caller: Caller, hints: RouteHints, meta: ResponseMeta
    ) -> AsyncIterator[bytes]:
        """SSE events as vLLM's server sends them, ending with `data: [DONE]` (Anthropic's message_stop); meta is
        filled before the first."""
        turn = await self._store.turn(caller.tenant, data) if endpoint == RESPONSES else None
        body = self._body(endpoint, data if turn is None else turn.data, True, hints)
        plan, hints = self._plan(endpoint, body, True, caller, hints, meta)
        if (kept := await self._cached(endpoint, plan, caller, hints, meta)) is not None:
            for event in kept:
                yield event
            return
        request_id, replies = self._replies(endpoint, body, True, caller, hints, meta)
        store = self._store
        # The events as sent, for the cache (none past the largest answer it keeps).
        events: list[bytes] | None = [] if plan is not None and plan.keep else None
        size = 0

        async def finished(event: bytes) -> bytes:
            nonlocal events, size
            if events is not None:
                events.append(event)
                size += len(event)
                if self._cache is None or not self._cache.fits(size):
                    events = None
            return event if turn is None else await responses.finish_event(store, turn, event)

        # Until the first event an error is still a status code (a 4xx/5xx on REST); after it, in-band.
        first = await anext(replies, None)
        if first is None:
            raise Unavailable("the engine ended the stream before its first event")
        yield await finished(first.data)
        done, last = _ends(endpoint, first.data), first
        try:
            async for reply in replies:
                done, last = _ends(endpoint, reply.data), reply
                if done and reply.stopped_at_allowance:
                    meta.stopped = True
                    yield STOPPED_EVENT
                yield await finished(reply.data)
        except Exception as exc:
            log.warning("stream failed after it began", extra={"request_id": request_id, "error": str(exc)})
            yield error_event(endpoint, exc)
            return
        finally:
            await replies.aclose()
        if not done:
            yield error_event(endpoint, Unavailable("the engine ended the stream without finishing"))
        elif events is not None:
            self._keep(plan, request_id, tuple(events), last, meta)


def _ends(endpoint: int, event: bytes) -> bool:
    """Whether event is a whole stream's last."""
    if endpoint == RESPONSES:
        return event.startswith(responses.COMPLETED_EVENT)
    return event.startswith(anthropic.STOP_EVENT) if endpoint == MESSAGES else event.endswith(DONE)
