"""Counters the engine exposes: the scheduler keeps them, the engine-core process sends a
snapshot with every batch of outputs, and the Prometheus exporter (pagedllm/metrics) publishes them."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """The scheduler's state after one step: gauges (running, waiting, KV usage as a fraction
    of the blocks) and cumulative counters since the engine started."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # cumulative
    num_prompt_tokens: int = 0  # cumulative, tokens computed for prompts (cache hits excluded)
    num_generation_tokens: int = 0  # cumulative
    num_steps: int = 0
    # Cumulative; the scheduler's own copy stays empty, `EngineCore.make_stats` fills it in.
    prefix_cache_stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    # Speculative decoding, cumulative: drafts verified, their tokens, and those accepted
    # (`spec_acceptance_rate`). NOTE: last: tests build the fields above by position.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    spec_draft_time_s: float = 0.0  # the worker's draft model proposing them (0 for n-gram)

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed ones."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verifying request gets per step on average: its accepted drafts plus the
        one the target samples after them (1 + accepted / drafts)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def merge_stats(parts: list[SchedulerStats]) -> SchedulerStats:
    """The stats of several engine cores (data parallelism) as one engine's: counts and times
    summed, the KV-cache usage averaged (the cores have equal caches)."""
    merged = SchedulerStats()
    for name, value in vars(merged).items():
        if isinstance(value, PrefixCacheStats):
            setattr(
                merged,
                name,
                PrefixCacheStats(
                    *(sum(getattr(getattr(p, name), f) for p in parts) for f in vars(value))
                ),
            )
        else:
            setattr(merged, name, sum(getattr(p, name) for p in parts))
    if parts:
        merged.kv_cache_usage /= len(parts)
    return merged
