"""The limiter's Lua scripts on one Redis: a decision runs now; a settlement may wait, up to a delay (20 ms in
the router), to go to Redis in one pipeline with the settlements beside it and with the next decision.

A settlement sent on its own was the largest part of the control path's CPU that nothing waits for: one
round trip from the router and one script in Redis per request, about a tenth of the mesh's CPU per unary
request at concurrency 1 (measured side by side, batching on and off). Waiting costs no exactness: a decision
takes every settlement waiting at that moment to Redis ahead of itself, in the same pipeline, so Redis applies
them first and the decision sees every settlement that had ended before it was asked, as it did when each went
alone. Until a settlement lands its reservation counts in full, as it did while its own round trip was on the
way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

# Settlements sent at once at most (more waiting go without waiting for the delay).
MOST_BATCHED = 128

KeysArgs = tuple[Sequence[Any], Sequence[Any]]


class Scripts:
    """Runs the scripts registered on one Redis: now (with every deferred one ahead, in one pipeline), or
    deferred up to delay_seconds (0: never deferred, every call goes alone)."""

    def __init__(self, redis: Redis, delay_seconds: float = 0.0, most: int = MOST_BATCHED) -> None:
        self.redis = redis
        self._delay = delay_seconds
        self._most = most
        self._queued: list[tuple[Script, KeysArgs, asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    def register(self, text: str) -> Script:
        return Script(self, text)

    async def now(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if not self._queued:
            return await script.registered(keys=keys, args=args)
        future = asyncio.get_running_loop().create_future()
        self._send([*self._take(), (script, (keys, args), future)])
        # The pipeline runs as a task of its own: a decision whose caller went away still lands the settlements.
        return await future

    async def later(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._delay <= 0:
            return await script.registered(keys=keys, args=args)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((script, (keys, args), future))
        if len(self._queued) >= self._most:
            self._send(self._take())
        elif self._timer is None:
            self._timer = loop.call_later(self._delay, lambda: self._send(self._take()))
        return await future

    def _take(self) -> list[tuple[Script, KeysArgs, asyncio.Future[Any]]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        return queued

    def _send(self, batch: list[tuple[Script, KeysArgs, asyncio.Future[Any]]]) -> None:
        if batch:
            task = asyncio.get_running_loop().create_task(self._pipeline(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _pipeline(self, batch: list[tuple[Script, KeysArgs, asyncio.Future[Any]]]) -> None:
        """One round trip for the batch, in its order; each call's future gets its reply or its error."""
        pipe = self.redis.pipeline(transaction=False)
        for script, (keys, args), _ in batch:
            pipe.evalsha(script.registered.sha, len(keys), *keys, *args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every call did (cancelled: the service is stopping)
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (script, (keys, args), future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted since the script was loaded: load it again
                try:
                    reply = await script.registered(keys=keys, args=args)
                except Exception as exc:
                    reply = exc
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def close(self) -> None:
        """Sends what waits, and waits for every pipeline under way."""
        self._send(self._take())
        if self._running:
            await asyncio.wait(set(self._running), timeout=10)


class Script:
    """One Lua script: called, it runs now; later() defers it as its Scripts defer."""

    def __init__(self, scripts: Scripts, text: str) -> None:
        self._scripts = scripts
        self.registered = scripts.redis.register_script(text)

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self._scripts.now(self, keys, args)

    async def later(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self._scripts.later(self, keys, args)


def scripts_of(redis: Redis | Scripts) -> Scripts:
    """The Scripts a limiter part runs on: given, or none deferred on a bare client."""
    return redis if isinstance(redis, Scripts) else Scripts(redis)
