"""A streaming load generator for OpenAI-compatible chat endpoints: TTFT and output tokens/s."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RoundResult:
    """One round of requests at one concurrency against one target."""

    target: str
    concurrency: int
    requests: int
    wall_s: float
    completion_tokens: int
    ttfts_s: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[float, int]:
    start = time.perf_counter()
    ttft = float("nan")
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content") and ttft != ttft:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return ttft, tokens


async def run_round(
    target: str,
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    headers: dict[str, str] | None = None,
) -> RoundResult:
    """Sends every prompt once, at most `concurrency` at a time, streamed, greedy."""
    url = f"{base_url}/v1/chat/completions"
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    result = RoundResult(target, concurrency, len(prompts), 0.0, 0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                try:
                    ttft, tokens = await _one(client, url, body)
                except Exception:
                    result.errors += 1
                    continue
                result.ttfts_s.append(ttft)
                result.completion_tokens += tokens

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result
