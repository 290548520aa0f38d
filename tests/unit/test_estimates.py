"""Reserving on a guess while the prompt renders: the guess, and what the router holds when it was right or
wrong (a budget that records every call stands in for the rate-limit service)."""

from __future__ import annotations

import asyncio

from services.inference.metering import Exchange
from services.router.accounting import Metered
from services.router.caller import Caller
from services.router.estimates import MARGIN_TOKENS, MIN_SAMPLES, Guess, PromptEstimator, most_generated
from services.router.pipeline import Pipeline
from services.runtime.errors import ResourceExhausted
from tests.unit.test_completions import FakeBudget, FakeReplica, completions

CALLER = Caller("acme", "key_1", None)


def test_a_guess_needs_history_and_a_max_tokens_and_covers_the_largest_ratio_seen() -> None:
    estimator = PromptEstimator()
    for _ in range(MIN_SAMPLES - 1):
        estimator.learn("m", 1, 400, 100)
    assert estimator.guess("m", 1, 400, 64) is None  # too little history: reserve after rendering
    estimator.learn("m", 1, 400, 120)
    assert estimator.guess("m", 1, 400, None) is None  # the engine decides the length: no guess
    guess = estimator.guess("m", 1, 800, 64)
    assert guess is not None and (guess.prompt_tokens, guess.max_tokens) == (240 + MARGIN_TOKENS, 64)
    assert estimator.guess("m", 2, 800, 64) is None  # another endpoint learns apart


def test_most_generated_reads_the_body_as_the_engine_will() -> None:
    assert most_generated(True, {"max_tokens": 10, "n": 3}) == 30
    assert most_generated(True, {"max_completion_tokens": 7, "max_tokens": 10}) == 7
    assert most_generated(True, {}) is None
    assert most_generated(False, {"prompt": "hi"}) == 16
    assert most_generated(False, {"prompt": ["a", "b"], "max_tokens": 4}) is None


def _pipeline(budget: FakeBudget) -> Pipeline:
    return completions(FakeReplica("r1"), budget=budget).pipeline


async def test_a_covering_guess_is_the_only_reservation() -> None:
    budget = FakeBudget()
    metered = Metered(started=0.0, budgeted=True)
    guess = PromptEstimator()
    for _ in range(MIN_SAMPLES):
        guess.learn("m", 1, 100, 50)
    pipeline = _pipeline(budget)
    pipeline.count("req", CALLER, "m", metered, guess.guess("m", 1, 100, 32))
    reserve = pipeline.reserver("req", CALLER, "m", metered)
    assert reserve is not None
    await asyncio.sleep(0)  # the guess goes out before the replica has measured anything
    assert budget.reserved == [("req", 50 + MARGIN_TOKENS, 32)]
    await reserve(40, 32)
    assert budget.reserved == [("req", 50 + MARGIN_TOKENS, 32)]
    assert metered.reserved and metered.covered and metered.prompt_tokens == 40


async def test_a_guess_too_small_or_refused_gives_way_to_the_measured_counts() -> None:
    budget = FakeBudget()
    metered = Metered(started=0.0, budgeted=True)
    pipeline = _pipeline(budget)
    pipeline.count("req", CALLER, "m", metered, Guess(10, 32))
    reserve = pipeline.reserver("req", CALLER, "m", metered)
    assert reserve is not None
    await reserve(40, 32)  # more prompt than guessed: reserved again, measured, under the same id
    assert budget.reserved == [("req", 10, 32), ("req", 40, 32)]
    refusing = FakeBudget(refuse=ResourceExhausted("token limit reached"))
    metered = Metered(started=0.0, budgeted=True)
    pipeline = _pipeline(refusing)
    pipeline.count("req", CALLER, "m", metered, Guess(500, 32))
    reserve = pipeline.reserver("req", CALLER, "m", metered)
    assert reserve is not None
    await asyncio.sleep(0)
    assert not metered.reserved  # the guess did not fit: nothing held, and the measured counts decide
    refusing.refuse = None
    await reserve(40, 32)
    assert refusing.reserved == [("req", 40, 32)] and metered.covered


def test_the_replica_goes_ahead_on_condition_only_within_what_it_covers() -> None:
    early = Exchange()
    early.go_ahead(50, 32)  # before the measurement: held until it is known
    assert not early.proceed.is_set()
    early.prompt_tokens, early.max_tokens, early.measured = 40, 32, True
    early.release_if_covered()
    assert early.proceed.is_set()
    late = Exchange(prompt_tokens=60, max_tokens=32, measured=True)
    late.go_ahead(50, 32)  # the guess was too small: wait for the reservation of the measured counts
    assert not late.proceed.is_set()
    late.go_ahead()
    assert late.proceed.is_set()
    more = Exchange(prompt_tokens=40, max_tokens=64, measured=True)
    more.go_ahead(50, 32)
    assert not more.proceed.is_set()


async def test_a_request_that_stops_waiting_does_not_cancel_its_early_reservation() -> None:
    budget = FakeBudget()
    metered = Metered(started=0.0, budgeted=True)
    pipeline = _pipeline(budget)
    pipeline.count("req", CALLER, "m", metered, Guess(10, 32))
    assert pipeline.reserver("req", CALLER, "m", metered) is not None
    waiting = asyncio.ensure_future(pipeline.covered(metered))
    await asyncio.sleep(0)
    waiting.cancel()  # the replica's stream closed early (a client gone, a failover)
    assert metered.early is not None
    held = await metered.early  # still lands, so that it is settled
    assert held is not None and metered.reserved
