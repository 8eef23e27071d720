"""Counters the engine exposes (and the metrics exporter will publish)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups, counted in tokens like vLLM: `queries` prompt tokens looked up,
    `hits` of them found in the cache."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # cumulative
    num_prompt_tokens: int = 0  # cumulative, tokens computed for prompts (cache hits excluded)
    num_generation_tokens: int = 0  # cumulative
    num_steps: int = 0
