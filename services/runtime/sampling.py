"""One vocabulary for sampling: what a generation takes, as the router validates it and the engine applies it."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Sampling:
    """Generation settings; None takes the engine's default. Imports no gRPC."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: tuple[int, ...] = ()


# Sampling fields that are unset (None) unless the caller gives them (the rest are lists).
OPTIONAL_SAMPLING = tuple(f.name for f in fields(Sampling) if f.name not in ("stop", "stop_token_ids"))
