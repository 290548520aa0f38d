"""Spend in Redis: a request holds its expected cost in every budget that applies, in one script, before any
GPU work; a stream that uses what it held asks for more, and stops where no budget has more; settlement
charges the exact cost. So no concurrency can spend past a budget: what is held and spent never exceeds it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from services.billing.prices import QUANTUM, Prices
from services.ratelimit.budgets import Budget, micros, money
from services.ratelimit.scripts import Scripts, scripts_of
from services.ratelimit.windows import ESTIMATE, Estimate

_LIB = (Path(__file__).parent / "spend_lib.lua").read_text()
_HOLD = ESTIMATE + _LIB + (Path(__file__).parent / "spend_hold.lua").read_text()
_SETTLE = ESTIMATE + _LIB + (Path(__file__).parent / "spend_settle.lua").read_text()
# How long a hold is kept unsettled: then it goes back to its budgets (its router died before settling).
HOLD_SECONDS = 3600
# Labels stay bounded: a tenant's own budgets (and its models') are named by the rules file; keys' budgets
# are counted together per tenant scope "key" only where the tenant has budgets of its own, else as "other".
CHARGED = Counter(
    "meshserve_spend_charged_total",
    "Money charged to spend budgets at settlement, in the price table's currency, by tenant with budgets.",
    ["tenant"],
)
USED = Gauge(
    "meshserve_spend_budget_used_ratio",
    "Share of a spend budget spent or held, as last seen by a request's hold.",
    ["tenant", "scope", "model"],
)
REMAINING = Gauge(
    "meshserve_spend_budget_remaining",
    "What a spend budget has left this period, in the price table's currency, as last seen by a decision.",
    ["tenant", "scope", "model"],
)
# What to say about each kind of budget in a refusal.
SCOPES = {"key": "this key's budget", "tenant": "the tenant's budget", "model": "the tenant's budget for this model"}


@dataclass(frozen=True)
class Applied:
    """A budget that applies to a request, and where its spend is kept this period."""

    scope: str
    budget: Budget
    redis_key: str
    keep_seconds: float
    # The metrics' labels: (tenant, model) where the rules file names the budget; None for a key's own.
    labels: tuple[str, str] | None = None
    # Whose budget it is (a key id, a model; "" for a tenant's), and the period's name.
    subject: str = ""
    period: str = ""

    def observe(self, left: int) -> None:
        """Records what the budget has left, after a decision."""
        if self.labels is None:
            return
        tenant, model = self.labels
        limit = self.budget.limit_micros
        USED.labels(tenant, self.scope, model).set(1 - left / limit if limit else 1.0)
        REMAINING.labels(tenant, self.scope, model).set(float(money(left)))


@dataclass(frozen=True)
class Held:
    """What a request holds: the amount (millionths), the completion tokens it pays for (None: any number,
    completions cost nothing), and the tightest budget with what it has left."""

    held: bool
    amount: int
    allowance: int | None
    tightest: Applied | None
    left: int

    def refusal(self, prompt_tokens: int) -> str:
        """Why a request that does not fit was refused: which budget, and how much is left."""
        assert self.tightest is not None
        budget = self.tightest.budget
        scope = SCOPES.get(self.tightest.scope, "a budget")
        per = "in all" if budget.period.value == "none" else f"per {budget.period.value}"
        return (
            f"spend budget exhausted: {scope} of {budget.amount.normalize():f} {per} "
            f"has {money(self.left).normalize():f} left, and this request is expected to cost "
            f"{money(self.amount).normalize():f} ({prompt_tokens} prompt tokens and the completion estimate)"
        )


def allowance(prices: Prices, model: str, prompt_tokens: int, held: int) -> int | None:
    """The most completion tokens whose cost with the prompt's stays within what is held; None when
    completion tokens cost nothing."""
    price = prices.price_of(model)
    if price is None or price.completion_per_1k == 0:
        return None
    room = money(held) * 1000 - prompt_tokens * price.prompt_per_1k
    return max(0, int((room / price.completion_per_1k).to_integral_value(rounding=ROUND_FLOOR)))


class Spend:
    """Holds, extends and settles spend in the budgets of one Redis."""

    def __init__(
        self,
        redis: Redis | Scripts,
        prices: Callable[[], Prices],
        estimate: Estimate | None = None,
        hold_seconds: float = HOLD_SECONDS,
    ) -> None:
        scripts = scripts_of(redis)
        self._hold = scripts.register(_HOLD)
        self._settle = scripts.register(_SETTLE)
        self._prices = prices
        self._estimate = estimate or Estimate()
        self._hold_ms = int(hold_seconds * 1000)

    @staticmethod
    def applied(
        budgets: Sequence[tuple[str, str, Budget]], now: float, tenant: str, model: str, key_id: str
    ) -> list[Applied]:
        """The budgets (scope, Redis key prefix, budget) with this period's Redis keys."""
        out = []
        for scope, prefix, budget in budgets:
            label, keep = budget.window(now)
            labels = None if scope == "key" else (tenant, model if scope == "model" else "")
            subject = {"key": key_id, "model": model}.get(scope, "")
            out.append(Applied(scope, budget, f"{prefix}:{label}", keep, labels, subject, label))
        return out

    async def hold(
        self,
        applied: Sequence[Applied],
        hold_key: str,
        estimate_key: str,
        index_key: str,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
    ) -> Held:
        """Holds the prompt's cost and the completion estimate's in every budget, or in none (what the
        request held before is returned first)."""
        prices = self._prices()
        price = prices.price_of(model)
        base = micros(prices.cost(model, prompt_tokens, 0, ROUND_CEILING))
        # A completion token's cost in millionths (the script rounds the estimate's cost up).
        per_token = price.completion_per_1k / 1000 / QUANTUM if price is not None else Decimal(0)
        args: list[str | int | float] = ["hold", len(applied)]
        args += [a.budget.limit_micros for a in applied]
        args += [int(a.keep_seconds * 1000) for a in applied]
        args += [base, str(per_token), max_tokens, self._estimate.percentile, self._estimate.min_samples]
        args += [prompt_tokens, self._hold_ms, hold_key]
        args += [field for a in applied for field in (a.scope, a.subject, a.period)]
        keys = [a.redis_key for a in applied] + [hold_key, estimate_key, index_key]
        ok, amount, _, tight, left, *each = await self._hold(keys=keys, args=args)
        tightest = applied[int(tight) - 1] if tight else None
        for budget, budget_left in zip(applied, each, strict=True):
            budget.observe(int(budget_left))
        cap = allowance(prices, model, prompt_tokens, int(amount)) if ok else 0
        return Held(bool(ok), int(amount), cap, tightest, int(left))

    async def extend(self, hold_key: str, model: str, more_tokens: int) -> tuple[int | None, int]:
        """Holds the cost of up to more_tokens further completion tokens, as far as every budget has room:
        (the completion tokens the hold now pays for, None: any; what the tightest budget has left)."""
        prices = self._prices()
        _, amount, prompt_tokens, _, left = await self._hold(
            keys=[hold_key], args=["extend", micros(prices.cost(model, 0, more_tokens, ROUND_CEILING)) + 1, hold_key]
        )
        if not amount:
            return 0, int(left)
        return allowance(prices, model, int(prompt_tokens), int(amount)), int(left)

    async def settle(
        self,
        hold_key: str,
        estimate_key: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        learn: bool,
        tenant: str = "other",
    ) -> tuple[bool, int]:
        """Charges the exact cost in place of the hold: (settled, millionths returned). tenant labels the
        charge (a tenant with budgets of its own, else "other")."""
        cost = micros(self._prices().cost(model, prompt_tokens, completion_tokens, ROUND_CEILING))
        learned = completion_tokens if learn else -1
        settled, returned = await self._settle.later(
            keys=[hold_key, estimate_key], args=[cost, learned, self._estimate.samples, hold_key]
        )
        if settled:
            CHARGED.labels(tenant).inc(float(money(cost)))
        return bool(settled), int(returned)


@dataclass(frozen=True)
class BudgetState:
    """One budget over one period, as usage reports show it: amounts in millionths."""

    scope: str
    subject: str
    period: str
    limit: int
    spent: int
    held: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.held)


async def budget_states(redis: Redis, index_key: str) -> list[BudgetState]:
    """Every budget of a tenant that has been drawn on, this period and those still kept, sorted."""
    keys = sorted(await redis.smembers(index_key))
    states, gone = [], []
    for key in keys:
        fields = await redis.hmget(key, ["scope", "subject", "period", "limit", "spent", "held"])
        if fields[0] is None:  # its period ended and was dropped
            gone.append(key)
            continue
        scope, subject, period = (f.decode() if isinstance(f, bytes) else str(f or "") for f in fields[:3])
        states.append(BudgetState(scope, subject, period, *(int(f or 0) for f in fields[3:])))
    if gone:
        await redis.srem(index_key, *gone)
    return sorted(states, key=lambda s: (s.scope, s.subject, s.period))
