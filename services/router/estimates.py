"""What a request will need, guessed from its body before the replica has rendered it: the router reserves
tokens for the guess while the prompt renders, instead of after (one service call less on the way to the
first token). Imports no gRPC.

The replica measures the rendered prompt; when the guess covered it (prompt and the most it may generate),
the reservation stands as made (settled to the real count at the end, as every reservation is); when it
did not, the router reserves the measured counts in its place before anything is generated. So a request
is never refused for a guess, and never generates beyond what is reserved for it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from services.router.accounting import Reserved

# Rendered prompt tokens per byte of body, the highest of the last SAMPLES requests of a model and
# endpoint; guesses start once MIN_SAMPLES are known (until then the router reserves after rendering).
SAMPLES = 32
MIN_SAMPLES = 4
# Tokens added to every guess: the template's own (roles, a default system prompt) vary little.
MARGIN_TOKENS = 8


@dataclass(frozen=True)
class Guess:
    """Prompt tokens and the most tokens the request may generate (over every choice), as guessed."""

    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Hold:
    """What the first reservation (the request counted, a guess held if there was one) did."""

    guess: Guess | None
    reserved: Reserved

    def covers(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether nothing more is to be reserved for the measured counts."""
        within = self.guess is None or (
            prompt_tokens <= self.guess.prompt_tokens and max_tokens <= self.guess.max_tokens
        )
        return self.reserved.covers and within


def most_generated(endpoint_is_chat: bool, fields: dict[str, Any]) -> int | None:
    """The most tokens the request may generate, from its body; None where the engine decides it (no
    max_tokens: the context left after the prompt) or the body holds several prompts."""
    # Chat's max_completion_tokens, or the Responses API's max_output_tokens (read as chat's).
    limit = fields.get("max_completion_tokens", fields.get("max_output_tokens")) if endpoint_is_chat else None
    limit = limit if limit is not None else fields.get("max_tokens")
    if not endpoint_is_chat:
        limit = 16 if limit is None else limit  # OpenAI's and vLLM's default for completions
        if not isinstance(fields.get("prompt"), str):
            return None
    n = fields.get("n")
    n = 1 if n is None else n
    if not isinstance(limit, int) or not isinstance(n, int) or isinstance(limit, bool) or isinstance(n, bool):
        return None
    return limit * n


class PromptEstimator:
    """Learns, per model and endpoint, how many prompt tokens a body's bytes render to."""

    def __init__(self) -> None:
        self._ratios: dict[tuple[str, int], deque[float]] = {}

    def guess(self, model: str, endpoint: int, body_bytes: int, max_tokens: int | None) -> Guess | None:
        ratios = self._ratios.get((model, endpoint))
        if max_tokens is None or ratios is None or len(ratios) < MIN_SAMPLES:
            return None
        return Guess(math.ceil(max(ratios) * body_bytes) + MARGIN_TOKENS, max_tokens)

    def learn(self, model: str, endpoint: int, body_bytes: int, prompt_tokens: int) -> None:
        ratios = self._ratios.setdefault((model, endpoint), deque(maxlen=SAMPLES))
        ratios.append(prompt_tokens / max(1, body_bytes))
