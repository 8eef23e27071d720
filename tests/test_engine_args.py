"""Scheduler defaults by device and usage: vLLM's larger budgets on an H100/H200-class GPU."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from pagedllm import engine_args
from pagedllm.engine_args import EngineArgs, _scheduler_defaults


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, gib: int) -> None:
    props = SimpleNamespace(name=name, total_memory=gib * 2**30)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: props)


@pytest.mark.parametrize(
    ("name", "gib", "usage", "expected"),
    [
        ("NVIDIA H200", 140, "offline", (1024, 16384)),
        ("NVIDIA H200", 140, "server", (1024, 8192)),
        ("NVIDIA H100 80GB HBM3", 80, "offline", (1024, 16384)),
        ("NVIDIA A100-SXM4-80GB", 80, "offline", (256, 8192)),
        ("NVIDIA L4", 24, "offline", (256, 8192)),
    ],
)
def test_cuda_defaults(monkeypatch, name, gib, usage, expected) -> None:
    _fake_gpu(monkeypatch, name, gib)
    assert _scheduler_defaults("cuda", usage) == expected


def test_cpu_defaults_and_explicit_values_win(monkeypatch) -> None:
    assert _scheduler_defaults("cpu", "offline") == (engine_args.DEFAULT_MAX_NUM_SEQS, 4096)
    assert _scheduler_defaults("cpu", "server") == (engine_args.DEFAULT_MAX_NUM_SEQS, 2048)
    _fake_gpu(monkeypatch, "NVIDIA H200", 140)
    monkeypatch.setattr(engine_args, "_resolve_device", lambda _: "cuda")
    model_config = SimpleNamespace(max_model_len=4096)
    monkeypatch.setattr(engine_args, "_build_model_config", lambda *a: model_config)
    monkeypatch.setattr(engine_args, "get_hf_config", lambda _: None)
    captured = {}
    monkeypatch.setattr(engine_args, "SchedulerConfig", lambda **kw: captured.update(kw))
    monkeypatch.setattr(engine_args, "EngineConfig", lambda **kw: kw)
    for cls in ("CacheConfig", "DeviceConfig", "ParallelConfig"):
        monkeypatch.setattr(engine_args, cls, lambda **kw: kw)
    args = EngineArgs(model="qwen3-0.6b", load_format="dummy", max_num_batched_tokens=4096)
    args.usage_context = "offline"
    args.create_engine_config()
    assert (captured["max_num_seqs"], captured["max_num_batched_tokens"]) == (1024, 4096)


def test_usage_context_is_not_a_flag() -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert "--usage-context" not in parser.format_help()
    assert EngineArgs.from_cli_args(parser.parse_args([])).usage_context == "server"
