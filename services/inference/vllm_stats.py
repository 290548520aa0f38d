"""A vLLM stat logger that keeps the scheduler's latest load for GetLoad and WatchLoad."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.loggers import StatLoggerBase

if TYPE_CHECKING:
    from services.inference.engine import _StatsSink


def stat_logger_factory(sink: _StatsSink) -> Callable[[Any, int], StatLoggerBase]:
    """A factory vLLM calls once per engine; every logger writes into sink."""

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._sink = sink

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if iteration_stats is not None:
                self._sink.load.generation_tokens += iteration_stats.num_generation_tokens
            if scheduler_stats is not None:
                load = self._sink.load
                load.running = scheduler_stats.num_running_reqs
                load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                load.kv_cache_usage = scheduler_stats.kv_cache_usage
                # Per-interval counts since the last record; kept as totals since start.
                load.prefix_cache_queries += scheduler_stats.prefix_cache_stats.queries
                load.prefix_cache_hits += scheduler_stats.prefix_cache_stats.hits

        def log_engine_initialized(self) -> None:
            pass

    return LoadLogger
