"""Speculative decoding's metrics: the stats object (acceptance rate, mean accepted length, draft
time), its crossing to the API server (serial), the Prometheus counters
(`pagedllm:spec_decode_num_drafts` / `_num_draft_tokens` / `_num_accepted_tokens`), and the
summary `bench latency` / `bench throughput` print with `--speculative-config`."""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client import CollectorRegistry

from pagedllm.benchmarks import latency, throughput
from pagedllm.benchmarks.spec_decode import spec_decode_line
from pagedllm.engine import serial
from pagedllm.engine.outputs import EngineCoreOutputs
from pagedllm.engine.stats import SchedulerStats
from pagedllm.metrics.prometheus import PrometheusStatLogger


def test_stats_properties_and_wire() -> None:
    stats = SchedulerStats(num_drafts=4, num_draft_tokens=12, num_accepted_tokens=9,
                           spec_draft_time_s=0.25)  # fmt: skip
    assert stats.spec_acceptance_rate == 0.75
    assert stats.spec_mean_accepted_length == 1 + 9 / 4
    assert SchedulerStats().spec_acceptance_rate == 0 == SchedulerStats().spec_mean_accepted_length
    _, payload = serial.unpack(serial.encode_outputs(EngineCoreOutputs([], stats, {})))
    assert serial.decode_outputs(payload).stats == stats
    line = spec_decode_line(stats, SchedulerStats(num_drafts=1, num_draft_tokens=3))
    assert "3 drafts, 9 draft tokens, 9 accepted" in line and "acceptance rate 1.000" in line


def test_prometheus_counters() -> None:
    registry = CollectorRegistry()
    logger = PrometheusStatLogger("m", registry)

    def value(name: str) -> float | None:
        return registry.get_sample_value(f"pagedllm:spec_decode_{name}_total", {"model_name": "m"})

    logger.record_scheduler_stats(
        SchedulerStats(num_drafts=2, num_draft_tokens=6, num_accepted_tokens=4)
    )
    logger.record_scheduler_stats(
        SchedulerStats(num_drafts=5, num_draft_tokens=15, num_accepted_tokens=7)
    )
    assert (value("num_drafts"), value("num_draft_tokens"), value("num_accepted_tokens")) == (
        5,
        15,
        7,
    )


SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 3})


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_cli_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("module", [latency, throughput])
def test_benches_print_spec_stats(module, tiny_model_dirs, capsys) -> None:
    common = ["--model", tiny_model_dirs["llama"], "--dtype", "float32", "--max-model-len",
              "256", "--kv-cache-memory", "32MiB", "--speculative-config", SPEC]  # fmt: skip
    if module is latency:
        argv = ["--input-len", "16", "--output-len", "24", "--num-iters", "1", *common]
    else:
        argv = ["--num-prompts", "4", "--input-len", "8", "16", "--output-len", "8", "24",
                "--temperature", "0", *common]  # fmt: skip
    module.main(_parse(module, argv))
    out = capsys.readouterr().out
    assert "spec decode:" in out and "acceptance rate" in out, out
