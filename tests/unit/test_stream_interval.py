"""Tokens streamed several per event (vLLM's stream_interval, the replica's MESHSERVE_INFERENCE_STREAM_INTERVAL):
the setting reaches the engine, and the meter still counts every token exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.inference.config import InferenceSettings
from services.inference.engine import EngineConfig, engine_args
from services.inference.metering import EXCHANGE, Exchange, MeteredEngine
from tests.unit.test_metering_allowance import Choice, Output

vllm_sampling = pytest.importorskip("vllm.sampling_params")


def test_the_setting_reaches_vllms_engine_arguments_and_refuses_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MESHSERVE_INFERENCE_STREAM_INTERVAL", "4")
    settings = InferenceSettings()
    assert settings.stream_interval == 4
    config = EngineConfig("m", tmp_path, stream_interval=settings.stream_interval)
    assert engine_args(config).stream_interval == 4
    assert engine_args(EngineConfig("m", tmp_path)).stream_interval == 1  # every token at once
    with pytest.raises(ValidationError):
        InferenceSettings(stream_interval=0)


class ChunkedLLM:
    """Generates `tokens` tokens for one choice, `per_event` to a delta after the first (as vLLM does)."""

    def __init__(self, tokens: int, per_event: int) -> None:
        self.tokens, self.per_event = tokens, per_event

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
        sent = 0
        while sent < self.tokens:
            step = 1 if sent == 0 else min(self.per_event, self.tokens - sent)
            ids = list(range(sent, sent + step))
            last = sent + step == self.tokens
            yield Output([Choice(0, "".join(f"t{i}" for i in ids), ids, "stop" if last else None)], finished=last)
            sent += step


@pytest.mark.parametrize("whole", [False, True])
async def test_every_token_of_a_chunked_stream_is_counted(whole: bool) -> None:
    kind = vllm_sampling.RequestOutputKind.FINAL_ONLY if whole else vllm_sampling.RequestOutputKind.DELTA
    params = vllm_sampling.SamplingParams(max_tokens=10, output_kind=kind)
    exchange = Exchange()
    exchange.go_ahead()
    EXCHANGE.set(exchange)
    outputs = [o async for o in MeteredEngine(ChunkedLLM(10, 4)).generate({"prompt_token_ids": [1, 2]}, params, "r")]
    assert exchange.completion_tokens == 10
    ids = [i for o in outputs for c in o.outputs for i in c.token_ids]
    assert ids == list(range(10))
    assert len(outputs) == (1 if whole else 4)  # 1 + 4 + 4 + 1 tokens, or one whole reply
