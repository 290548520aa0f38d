"""The router's spare admissions (services/ratelimit/spares.py): at most one held per key and model, made once a
request of a key that comes often has been decided, sized to the requests the key sends in half a spare's life
(up to MOST_REQUESTS), and taken from by the next requests that fit. Imports no gRPC.

A key comes often when its last request came less than a spare's life ago: a key that comes seldom would only
pay for spares settled unused. A request that finds no spare is decided as before; one refused while a spare
was on its way, or held, takes from that spare (its room was held for just such a request), so the router never
admits fewer requests than the limits allow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.ratelimit.decisions import Reservation, TokenCaller
from services.ratelimit.spares import Spare, Spares

log = logging.getLogger(__name__)

Key = tuple[str, str, str]
# The most requests one spare decides.
MOST_REQUESTS = 16
# Keys whose last request is remembered, at most (the oldest are forgotten first).
MOST_KEYS_SEEN = 4096
# How fast the gap between a key's requests is followed (the weight of the newest gap).
GAP_WEIGHT = 0.2


def _key(caller: TokenCaller, model: str) -> Key:
    return caller.tenant, caller.key_id, model


@dataclass
class _Held:
    """A spare and what became of it: requests taken, of which some still unsettled, and their real counts."""

    key: Key
    spare: Spare
    taken: int = 0
    unsettled: int = 0
    real_tokens: int = 0
    completions: list[int] = field(default_factory=list)
    # Nothing more may be taken (all taken, too late, or shut down): settled once the last request taken is.
    closed: bool = False
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Seen:
    last: float
    # The gap between its requests, smoothed (negative until a second request came).
    gap: float


class SpareKeeper:
    """The spares of one router, and which request took from which (it settles into the spare)."""

    def __init__(
        self,
        spares: Spares,
        settle: Callable[[str, Callable[[], Awaitable[None]]], asyncio.Task[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spares = spares
        # How a spare's settlement is run, retried while Redis is away (the budget's settler).
        self._settle = settle
        self._clock = clock
        self._held: dict[Key, _Held] = {}
        self._coming: dict[Key, asyncio.Task[None]] = {}
        self._seen: dict[Key, _Seen] = {}
        self._taken: dict[str, _Held] = {}
        # The settlement of each key's last spare closed, on its way: the room it gives back.
        self._landing: dict[Key, asyncio.Task[None]] = {}

    def take(
        self, request_id: str, caller: TokenCaller, model: str, prompt_tokens: int, max_tokens: int
    ) -> Reservation | None:
        """A decision from the spare of caller's key and model, if one is held, still usable, and fits."""
        key = _key(caller, model)
        held = self._held.get(key)
        if held is None:
            return None
        spare = held.spare
        if not self._spares.usable(spare) or not spare.fits(prompt_tokens, max_tokens):
            self._close(held)  # too late, or too small: a fitting one is made after this request
            return None
        held.taken += 1
        held.unsettled += 1
        self._taken[request_id] = held
        if held.taken == spare.requests:
            self._close(held)
        self._spares.taken()
        return spare.reservation(held.taken)

    async def after_refusal(
        self, request_id: str, caller: TokenCaller, model: str, prompt_tokens: int, max_tokens: int
    ) -> tuple[Reservation | None, bool]:
        """After a refusal: a decision from the spare on its way or held, if it fits; else whether the room of a
        spare closed meanwhile has landed since (decide again: it may fit now)."""
        key = _key(caller, model)
        if (coming := self._coming.get(key)) is not None:
            await asyncio.shield(coming)
        if (taken := self.take(request_id, caller, model, prompt_tokens, max_tokens)) is not None:
            return taken, False
        if (landing := self._landing.get(key)) is not None:
            await asyncio.shield(landing)
            return None, True
        return None, False

    def leave(self, request_id: str) -> None:
        """The request holds tokens of its own from now (its measured counts did not fit its share): counted by
        the spare, it holds none of the spare's tokens."""
        held = self._taken.pop(request_id, None)
        if held is not None:
            self._settled(held)

    def settle(self, request_id: str, prompt_tokens: int, completion_tokens: int, learn: bool) -> bool:
        """Settles a request into the spare it took from; False where it took from none."""
        held = self._taken.pop(request_id, None)
        if held is None:
            return False
        held.real_tokens += prompt_tokens + completion_tokens
        if learn:
            held.completions.append(completion_tokens)
        self._settled(held)
        return True

    def _settled(self, held: _Held) -> None:
        held.unsettled -= 1
        if held.closed and not held.unsettled:
            self._settle_spare(held, None, final=True)

    def decided(self, caller: TokenCaller, model: str, prompt_tokens: int, max_tokens: int) -> None:
        """A request of caller on model was admitted: a spare for the next, where the key comes often and none
        is held or on its way."""
        key = _key(caller, model)
        now = self._clock()
        seen = self._seen.pop(key, None)
        if seen is None:
            self._seen[key] = _Seen(now, -1.0)
            if len(self._seen) > MOST_KEYS_SEEN:
                del self._seen[next(iter(self._seen))]
            return
        gap = now - seen.last
        often = gap <= self._spares.life_seconds
        seen.gap = gap if seen.gap < 0 else seen.gap + GAP_WEIGHT * (gap - seen.gap)
        seen.last = now
        self._seen[key] = seen
        if not often or key in self._held or key in self._coming:
            return
        # As many as the key sends in half a spare's life (the longest it may be taken from).
        requests = max(1, min(MOST_REQUESTS, int(self._spares.life_seconds / 2 / max(seen.gap, 1e-4))))
        self._coming[key] = asyncio.get_running_loop().create_task(
            self._make(key, caller, model, requests, prompt_tokens, max_tokens)
        )

    async def _make(
        self, key: Key, caller: TokenCaller, model: str, requests: int, prompt_tokens: int, max_tokens: int
    ) -> None:
        try:
            spare = await self._spares.make(caller, model, requests, prompt_tokens, max_tokens)
        except Exception:
            log.exception("a spare admission failed", extra={"tenant": caller.tenant, "model": model})
            return
        finally:
            self._coming.pop(key, None)
        if spare is None:
            return
        held = _Held(key, spare)
        loop = asyncio.get_running_loop()
        held.expiry = loop.call_at(loop.time() + max(0.0, spare.deadline - self._clock()), self._close, held)
        self._held[key] = held

    def _close(self, held: _Held) -> None:
        """Nothing more is taken from it: the room its untaken requests hold goes back now."""
        if self._held.get(held.key) is held:
            del self._held[held.key]
        if held.expiry is not None:
            held.expiry.cancel()
        if not held.closed:
            held.closed = True
            self._settle_spare(held, held.taken, final=not held.unsettled)

    def _settle_spare(self, held: _Held, taken: int | None, final: bool) -> None:
        spare, learned = held.spare, tuple(held.completions) if final else ()
        tokens = held.real_tokens + held.unsettled * spare.share
        landing = self._settle(spare.id, lambda: self._spares.settle(spare, taken, tokens, learned, final))
        self._landing[held.key] = landing
        landing.add_done_callback(lambda _: self._landed(held.key, landing))

    def _landed(self, key: Key, landing: asyncio.Task[None]) -> None:
        if self._landing.get(key) is landing:
            del self._landing[key]

    async def close(self) -> None:
        """Closes every spare held, once those on their way have come (each settles once its requests have)."""
        if self._coming:
            await asyncio.gather(*self._coming.values(), return_exceptions=True)
        for held in list(self._held.values()):
            self._close(held)
