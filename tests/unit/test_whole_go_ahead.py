"""When a whole reply's go-ahead goes with its start (services/router/openai_api.py), with fakes: where the
request's first reservation has landed, the replica call waits for it; where it is still on its way to Redis,
the call starts at once and the replica renders the prompt meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from meshserve.inference.v1 import inference_pb2 as ipb
from services.router.accounting import Reserved
from services.router.caller import RouteHints
from services.router.catalogue import Catalogue, ModelEntry, Version
from services.router.completions import Completions
from services.router.estimates import MIN_SAMPLES
from services.router.openai_api import CHAT, OpenAIApi, ResponseMeta
from tests.unit.test_completions import FakeBudget, FakeDirectory
from tests.unit.test_response_cache import ACME, ServingReplica, chat

PROMPT_TOKENS = 5  # what ServingReplica measures


class SlowBudget(FakeBudget):
    """Answers once told to (Redis on its way), or at once."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.answer.set()

    async def reserve(self, *args: Any, **kwargs: Any) -> Reserved:
        await self.answer.wait()
        return await super().reserve(*args, **kwargs)


class Recording(ServingReplica):
    """Notes whether each call waited for its reservation (whole) and what it covered when it did."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[bool] = []
        self.covered: list[tuple[int, int] | None] = []
        self.called = asyncio.Event()

    async def serve(
        self,
        start: ipb.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Any = None,
        allowance: Any = None,
        whole: bool = False,
    ) -> AsyncGenerator[ipb.ServeResponse, None]:
        self.waited.append(whole)
        self.called.set()
        self.covered.append(await cover() if whole and cover is not None else None)
        async for reply in super().serve(start, reserve, cover, allowance, whole):
            yield reply


async def test_a_landed_reservation_goes_with_the_start_and_one_on_its_way_does_not() -> None:
    budget, replica = SlowBudget(), Recording()
    entry = ModelEntry("m", (Version("v1", 1.0, (replica.address,)),), 1700000000, "meshserve")
    completions = Completions(lambda: Catalogue([entry]), FakeDirectory(replica), budget=budget)  # type: ignore[arg-type]
    openai = OpenAIApi(completions.pipeline, reserve_on_guess=True)

    async def ask() -> None:
        await openai.whole(CHAT, chat(max_tokens=16), ACME, RouteHints(), ResponseMeta())

    for _ in range(MIN_SAMPLES):
        await ask()  # these teach the estimator the prompt's size: no guess, nothing to cover
    await ask()  # a guess, decided at once (as a spare decides it): it goes with the start
    budget.answer.clear()
    replica.called.clear()
    on_its_way = asyncio.create_task(ask())
    await replica.called.wait()
    budget.answer.set()  # the replica was called before Redis answered
    await on_its_way
    assert replica.waited == [True] * (MIN_SAMPLES + 1) + [False]
    # The first had no guess to cover; the guessed one's go-ahead covered the prompt it measured.
    assert replica.covered[:MIN_SAMPLES] == [None] * MIN_SAMPLES
    guessed = replica.covered[MIN_SAMPLES]
    assert guessed is not None and guessed[0] >= PROMPT_TOKENS
    assert len(budget.counted) == MIN_SAMPLES + 2
