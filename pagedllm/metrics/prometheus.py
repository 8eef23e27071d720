"""Prometheus metrics of an `AsyncLLM`, under vLLM's names with the prefix `pagedllm:`.

Scheduler state comes from the engine core's stats (one snapshot per step; with data
parallelism, every core's merged): gauges are set from it, and its cumulative counters
(prefix-cache queries and hits, preemptions, speculative decoding's drafts, draft tokens and
accepted tokens) are turned into counter increments. Request metrics come from the client, which
sees every request's outputs arrive: token counts, time to first token, inter-token latency,
end-to-end latency, queue time (measured in the core: from the request reaching it to its first
schedule), and finished requests by finish reason.

Every metric carries a `model_name` label, as vLLM's do. The server exposes the registry at
GET /metrics (`prometheus_client.generate_latest(registry)`).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from pagedllm.engine.stats import SchedulerStats

PREFIX = "pagedllm:"

# Bucket bounds in seconds, wide enough for CPU runs (slow) and GPU runs (fast).
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def unregister_pagedllm_metrics(registry: CollectorRegistry) -> None:
    """Removes this module's collectors from `registry` (a new engine in the same process
    re-creates them; prometheus_client refuses a name registered twice)."""
    # NOTE: prometheus_client has no public lookup by name; vLLM reads the same private map.
    collectors = list(getattr(registry, "_collector_to_names", {}).items())
    for collector, names in collectors:
        if any(name.startswith(PREFIX) for name in names):
            registry.unregister(collector)


class PrometheusStatLogger:
    """Records one engine's stats into a Prometheus registry (default: the global one)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        unregister_pagedllm_metrics(self.registry)
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

        self.num_requests_running = gauge(
            "num_requests_running", "Requests in the running batch."
        ).labels(model_name)
        self.num_requests_waiting = gauge(
            "num_requests_waiting", "Requests waiting to be scheduled."
        ).labels(model_name)
        self.kv_cache_usage = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = all)."
        ).labels(model_name)
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(model_name)
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache."
        ).labels(model_name)
        self.num_preemptions = counter(
            "num_preemptions", "Requests preempted (their KV cache freed, to be recomputed)."
        ).labels(model_name)
        self.spec_decode_num_drafts = counter(
            "spec_decode_num_drafts",
            "Speculative decoding: drafts verified (one per request per step that verified any).",
        ).labels(model_name)
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified."
        ).labels(model_name)
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted."
        ).labels(model_name)
        self.prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens of requests that produced a first token."
        ).labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(
            model_name
        )
        self._request_success = counter(
            "request_success", "Finished requests, by finish reason.", ("finished_reason",)
        )
        self._model_name = model_name
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            _TTFT_BUCKETS,
        ).labels(model_name)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Between two consecutive outputs of a request.",
            _ITL_BUCKETS,
        ).labels(model_name)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "From a request's arrival to its last output.",
            _REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "From a request reaching the engine core to its first schedule.",
            _REQUEST_BUCKETS,
        ).labels(model_name)
        self._last = SchedulerStats()

    def record_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        last, self._last = self._last, stats
        cache, last_cache = stats.prefix_cache_stats, last.prefix_cache_stats
        self.prefix_cache_queries.inc(max(cache.queries - last_cache.queries, 0))
        self.prefix_cache_hits.inc(max(cache.hits - last_cache.hits, 0))
        self.num_preemptions.inc(max(stats.num_preemptions - last.num_preemptions, 0))
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            metric = getattr(self, f"spec_decode_{name}")
            metric.inc(max(getattr(stats, name) - getattr(last, name), 0))

    def record_finished(self, finish_reason: str | None) -> None:
        self._request_success.labels(self._model_name, finish_reason or "unknown").inc()
