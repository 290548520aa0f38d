"""An inference replica that replays a script instead of running a model: a test double for the real router.

Prompts: "down" refuses at once (UNAVAILABLE), "bug" fails at once with INTERNAL (a fault of that request,
not of the replica), "fail" fails after its tokens; anything else streams
SCRIPTED_TOKENS tokens (default 2: "Hello there"), SCRIPTED_TOKEN_SECONDS apart, the first being the
replica's SCRIPTED_NAME so tests see where a request landed. SCRIPTED_BROKEN=1 makes every Generate
fail before its first token while the load stream stays up (an engine that died inside a live server).
Events go to SCRIPTED_EVENTS as lines "start|done|abort <request_id>". WatchLoad reports the open calls
against SCRIPTED_CAPACITY slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from meshserve.inference.v1 import inference_pb2 as ipb
from meshserve.inference.v1 import inference_pb2_grpc
from services.runtime.errors import InvalidArgument
from services.runtime.server import Runtime, serve
from services.runtime.settings import ServiceSettings

if TYPE_CHECKING:
    from services.mesh.local import LocalMesh, Proc

SERVICE = ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))  # as vLLM's pydantic models write it


def _prompt_of(body: Any, chat: bool) -> str:
    """The text the script reacts to; a body whose prompt vLLM's serving layer refuses is refused (400)."""
    value = body.get("messages" if chat else "prompt") if isinstance(body, dict) else None
    if chat:
        if not isinstance(value, list) or not value or not isinstance(value[-1], dict):
            raise InvalidArgument("messages: must be a non-empty list of messages")
        value = value[-1].get("content") or ""
    if isinstance(value, str) and (value or chat):
        return value
    if isinstance(value, list) and value:
        parts = [p if isinstance(p, str) else str(p.get("text", "")) if isinstance(p, dict) else "" for p in value]
        return "".join(parts)
    raise InvalidArgument("Either prompt or prompt_embeds must be provided and non-empty.")


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, draining: asyncio.Event) -> None:
        self.name = os.environ.get("SCRIPTED_NAME", "Hello")
        self.tokens = int(os.environ.get("SCRIPTED_TOKENS", "2"))
        self.token_seconds = float(os.environ.get("SCRIPTED_TOKEN_SECONDS", "0.05"))
        self.capacity = int(os.environ.get("SCRIPTED_CAPACITY", "8"))
        self.broken = os.environ.get("SCRIPTED_BROKEN") == "1"
        self.events = Path(os.environ["SCRIPTED_EVENTS"]) if os.environ.get("SCRIPTED_EVENTS") else None
        self.running = 0
        self.draining = draining

    def _event(self, kind: str, request_id: str) -> None:
        if self.events is not None:
            with self.events.open("a") as out:
                out.write(f"{kind} {request_id}\n")

    async def Generate(self, request: ipb.GenerateRequest, context: Any) -> AsyncIterator[ipb.GenerateResponse]:
        turns = request.input.conversation.turns
        prompt = turns[-1].content if turns else request.input.text
        if prompt == "down" or self.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is restarting")
        if prompt == "bug":
            await context.abort(grpc.StatusCode.INTERNAL, "engine failed on this request")
        texts = [self.name, *[" there"] * (self.tokens - 1)]
        self.running += 1
        self._event("start", request.request_id)
        finished = False
        try:
            for i, text in enumerate(texts, 1):
                yield ipb.GenerateResponse(text=text, token_ids=[i], prompt_tokens=3, completion_tokens=i)
                await asyncio.sleep(self.token_seconds)
            if prompt == "fail":
                await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
            finished = True
            yield ipb.GenerateResponse(
                prompt_tokens=3, completion_tokens=len(texts), finish_reason=ipb.FINISH_REASON_STOP
            )
        finally:
            self.running -= 1
            self._event("done" if finished else "abort", request.request_id)

    async def Serve(self, requests: AsyncIterator[ipb.ServeRequest], context: Any) -> AsyncIterator[ipb.ServeResponse]:
        """vLLM's serving layer, played: the script's tokens as OpenAI bodies or SSE events."""
        start = (await anext(aiter(requests))).start
        body = json.loads(start.body)
        chat = start.endpoint == ipb.ENDPOINT_CHAT_COMPLETIONS
        prompt = _prompt_of(body, chat)
        steps = self.Generate(ipb.GenerateRequest(request_id=start.request_id, input=ipb.Input(text=prompt)), context)
        most = body.get("max_tokens") or 16

        def covers(go: ipb.ServeProceed) -> bool:
            return go.prompt_tokens == 0 or (go.prompt_tokens >= 3 and go.max_tokens >= most)

        # As vLLM's replica: where the start lets it go ahead, the counts ride on the first reply with data.
        ahead = start.proceed or (start.HasField("go_ahead") and covers(start.go_ahead))
        measure = {"measured": True, "max_tokens": most} if ahead else {}
        if not ahead:
            yield ipb.ServeResponse(measured=True, prompt_tokens=3, max_tokens=most)
            async for message in requests:  # a go-ahead, or one on condition that covers the measurement
                if covers(message.proceed):
                    break
            else:
                return  # half-closed without one: ended, as the replica ends it
        rid = ("chatcmpl-" if chat else "cmpl-") + start.request_id
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "model": start.model}
        texts: list[str] = []
        async for step in steps:
            texts.append(step.text)
            if body.get("stream") and step.text:
                choice = {"index": 0, "delta": {"content": step.text}} if chat else {"index": 0, "text": step.text}
                event = {**head, "object": head["object"] + ".chunk" if chat else head["object"], "choices": [choice]}
                yield ipb.ServeResponse(
                    data=f"data: {_json(event)}\n\n".encode(), prompt_tokens=3, completion_tokens=len(texts), **measure
                )
                measure = {}
        usage = {"prompt_tokens": 3, "completion_tokens": len(texts) - 1, "total_tokens": len(texts) + 2}
        done = {"prompt_tokens": 3, "completion_tokens": len(texts) - 1, "finish_reason": ipb.FINISH_REASON_STOP}
        if body.get("stream"):
            final = (
                {"index": 0, "delta": {}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": "", "finish_reason": "stop"}
            )
            event = {**head, "object": head["object"] + ".chunk" if chat else head["object"], "choices": [final]}
            if (body.get("stream_options") or {}).get("include_usage"):
                event["usage"] = usage
            data = f"data: {_json(event)}\n\ndata: [DONE]\n\n".encode()
            yield ipb.ServeResponse(data=data, **done, **measure)  # type: ignore[arg-type]
            return
        text = "".join(texts)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        whole = {**head, "choices": [{**choice, "finish_reason": "stop"}], "usage": usage}
        yield ipb.ServeResponse(data=_json(whole).encode(), **done, **measure)  # type: ignore[arg-type]

    async def CountTokens(self, request: ipb.CountTokensRequest, context: Any) -> ipb.CountTokensResponse:
        # Every prompt is 3 tokens, as Generate reports; a context of 2048 like the packaged model's.
        return ipb.CountTokensResponse(prompt_tokens=3, max_model_len=2048)

    async def WatchLoad(self, request: ipb.WatchLoadRequest, context: Any) -> AsyncIterator[ipb.WatchLoadResponse]:
        sent = None
        while not self.draining.is_set():
            load = ipb.GetLoadResponse(
                running=min(self.running, self.capacity),
                waiting=max(0, self.running - self.capacity),
                in_flight=self.running,
                max_num_seqs=self.capacity,
            )
            if load != sent:  # as a real replica reports: a change, once
                yield ipb.WatchLoadResponse(load=load)
                sent = load
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.draining.wait(), (request.interval_ms or 250) / 1000)


def start(mesh: LocalMesh, name: str, tokens: int, token_seconds: float, **env: str) -> Proc:
    """Starts a scripted replica as a service of mesh, named name, streaming tokens token_seconds apart."""
    settings = {"SCRIPTED_NAME": name, "SCRIPTED_TOKENS": str(tokens), "SCRIPTED_TOKEN_SECONDS": str(token_seconds)}
    return mesh.start_service(name, __name__, "MESHSERVE_", {**settings, **env}, kind="inference")


def full_mesh(
    mesh: LocalMesh, rules: Path, tokens: int, token_seconds: float, replicas: int = 1, **env: str
) -> list[Proc]:
    """Starts the whole mesh (Redis, auth, rate limits, billing, router, Envoy, a first user key) over
    scripted replicas named inference, inference-2, ...; returns the replicas."""
    mesh.start_redis()
    auth = mesh.start_auth()
    ratelimit = mesh.start_ratelimit(rules=rules)
    billing = mesh.start_billing()
    engines = [
        start(mesh, "inference" if i == 0 else f"inference-{i + 1}", tokens, token_seconds, **env)
        for i in range(replicas)
    ]
    for proc in (auth, ratelimit, billing, *engines):
        mesh.wait_serving(proc, 60)
    router = mesh.start_router(replicas=[f"127.0.0.1:{p.grpc_port}" for p in engines])
    mesh.wait_serving(router, 60)
    mesh.wait_routable(router, engines, 30)
    mesh.start_envoy()
    mesh.wait_edge(30)
    mesh.ensure_user_key()
    return engines


@contextmanager
def scripted_mesh(
    state_dir: Path, rules: Path, tokens: int, token_seconds: float, replicas: int = 1, edge_tls: bool = False
) -> Iterator[LocalMesh]:
    """The whole mesh over scripted replicas (full_mesh), stopped on the way out."""
    from services.mesh.local import LocalMesh, MeshOptions

    options = MeshOptions(
        state_dir=state_dir, model="smollm2-135m-instruct", model_store=Path("unused"), edge_tls=edge_tls
    )
    mesh = LocalMesh(options)
    try:
        full_mesh(mesh, rules, tokens, token_seconds, replicas)
        yield mesh
    finally:
        mesh.stop()


def main() -> None:
    async def setup(rt: Runtime) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(ScriptedInference(rt.draining), rt.server)

    serve("scripted-inference", ServiceSettings(), [SERVICE], setup)


if __name__ == "__main__":
    main()
