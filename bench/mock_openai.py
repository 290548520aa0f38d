"""A mock OpenAI chat engine over HTTP (aiohttp): every chat completion is the same few tokens at once,
whole or as SSE chunks ending with `data: [DONE]`. What a gateway in front of it adds is the gateway's cost.

    python -m bench.mock_openai --port 8000 [--tokens 4]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from aiohttp import web


def _reply(model: str, tokens: int) -> dict[str, object]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(["word"] * tokens)},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    }


def _chunk(rid: str, model: str, delta: dict[str, str], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return f"data: {json.dumps({**body, 'choices': [choice]})}\n\n".encode()


def app(tokens: int) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        if not body.get("stream"):
            return web.json_response(_reply(model, tokens))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        await response.write(_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        for i in range(tokens):
            await response.write(_chunk(rid, model, {"content": "word" if i == 0 else " word"}, None))
        await response.write(_chunk(rid, model, {}, "length"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/v1/models", models)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()
    web.run_app(app(args.tokens), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
