"""The benchmark client's own arithmetic (no server): the workload, arrivals and statistics."""

from __future__ import annotations

import math
import statistics

import pytest

from pagedllm.benchmarks.serve import (
    RequestResult,
    arrival_delays,
    build_prompts,
    format_summary,
    summarize,
)
from pagedllm.benchmarks.workloads import t1_requests


def test_prompts_follow_t1_with_outputs_capped() -> None:
    prompts = build_prompts(50, (100, 1024), (100, 1024), 512, 32000, seed=0)
    ref = t1_requests(50, (100, 1024), (100, 1024), 32000, 0)
    assert [p.prompt for p in prompts] == [r.prompt_token_ids for r in ref]
    assert [p.output_len for p in prompts] == [min(r.output_len, 512) for r in ref]
    assert any(r.output_len > 512 for r in ref)  # the cap matters for this draw
    assert all(0 <= t < 32000 for p in prompts for t in p.prompt)


def test_poisson_arrivals() -> None:
    assert arrival_delays(5, math.inf, 0) == [0.0] * 5
    gaps = arrival_delays(20000, 8.0, 0)
    assert gaps[0] == 0.0
    assert statistics.fmean(gaps[1:]) == pytest.approx(1 / 8, rel=0.03)
    assert statistics.pstdev(gaps[1:]) == pytest.approx(1 / 8, rel=0.05)  # exponential
    assert arrival_delays(10, 8.0, 1) == arrival_delays(10, 8.0, 1)
    with pytest.raises(ValueError, match="request-rate"):
        arrival_delays(3, 0.0, 0)


def test_summary_statistics() -> None:
    results = [
        RequestResult(True, 10, 5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(True, 20, 3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        RequestResult(False, 30, error="HTTP 400: bad"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["num_prompts"]) == (2, 1, 3)
    assert s["total_output_tokens"] == 8 and s["total_input_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["p50_ttft_ms"] == pytest.approx(200.0)
    # TPOT: (latency - ttft) / (tokens - 1) per request: 0.1 and 0.2 s.
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    assert s["p50_itl_ms"] == pytest.approx(100.0) and s["p99_itl_ms"] == pytest.approx(200.0)
    assert s["errors"] == ["HTTP 400: bad"]
    s.update(base_url="http://x", endpoint="/v1/completions", model="m", request_rate="inf")
    s["max_concurrency"] = None
    assert "completed 2/3" in format_summary(s)
