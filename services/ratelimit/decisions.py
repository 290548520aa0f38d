"""What the limiter decides: request decisions over Envoy's descriptors, and reservations of tokens and money."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.ratelimit.budgets import Budget
from services.ratelimit.spend import Held
from services.ratelimit.windows import WindowState, tightest

# Envoy descriptor entries this service understands.
TENANT, KEY_ID, KEY_RPM, MODEL = "tenant", "key_id", "key_rpm", "model"


@dataclass(frozen=True)
class DescriptorResult:
    """The tightest window of one descriptor, for Envoy's per-descriptor status and x-ratelimit headers."""

    over_limit: bool
    window: WindowState | None


@dataclass(frozen=True)
class RequestDecision:
    """A decision over every descriptor of one request."""

    admitted: bool
    descriptors: tuple[DescriptorResult, ...]
    retry_after_seconds: float | None
    # False when Redis was unreachable and the fail-open mode let the request through.
    enforced: bool = True

    def refusal(self) -> str:
        """Why the request was refused: every window it was over."""
        over = [d.window for d in self.descriptors if d.over_limit and d.window is not None]
        what = "; ".join(f"{w.limit.limit} requests per {w.limit.seconds} s per {w.limit.scope.value}" for w in over)
        return f"rate limit exceeded ({what}); retry after {self.retry_after_seconds or 0:.1f} s"

    def tightest(self) -> WindowState | None:
        return tightest([d.window for d in self.descriptors if d.window is not None])


class TokenHold(enum.Enum):
    """What a reservation does with its tokens."""

    REQUIRED = "required"  # hold them or refuse
    IF_ROOM = "if_room"  # hold them if they fit (a guess, replaced by the measured counts when it was not held)
    NONE = "none"  # hold nothing: only count the request


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one generation."""

    reserved_tokens: int
    estimated_completion_tokens: int
    enforced: bool
    # The window with the least room left after the reservation (OpenAI's x-ratelimit-*-tokens headers).
    tightest: WindowState | None = None
    # Tokens are held (to be settled): false when nothing was to be held, did not fit a guess, or no limit applied.
    held: bool = False
    # The tightest request window after the request was counted (OpenAI's x-ratelimit-*-requests headers).
    requests: WindowState | None = None
    # Money held in spend budgets: what it pays for, and the tightest budget's state.
    spend: Held | None = None


@dataclass(frozen=True)
class TokenCaller:
    """Whose budgets a reservation draws on."""

    tenant: str
    key_id: str
    key_tokens_per_minute: int = 0
    key_requests_per_minute: int = 0
    # The key's own spend budget, if it has one.
    key_budget: Budget | None = None

    def descriptors(self, model: str) -> list[dict[str, str]]:
        """The request-limit descriptors of one request of this caller, as the edge sends them."""
        tenant = {TENANT: self.tenant}
        key = {**tenant, KEY_ID: self.key_id, KEY_RPM: str(self.key_requests_per_minute)}
        return [key, tenant, {**tenant, MODEL: model}]
