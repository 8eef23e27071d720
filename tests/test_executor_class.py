"""The executor is chosen from ParallelConfig in one place (`pagedllm.executor.executor_class`)."""

from __future__ import annotations

import pytest

from pagedllm.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from pagedllm.executor import executor_class


def config(**parallel) -> EngineConfig:
    return EngineConfig(
        model_config=None,  # type: ignore[arg-type]
        cache_config=CacheConfig(),
        scheduler_config=SchedulerConfig(8, 64, 128),
        parallel_config=ParallelConfig(**parallel),
        device_config=None,  # type: ignore[arg-type]
    )


def test_one_worker_runs_in_the_engines_process() -> None:
    from pagedllm.executor.uniproc import UniProcExecutor

    assert executor_class(config()) is UniProcExecutor


@pytest.mark.parametrize(
    "parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"]
)
def test_more_workers_are_refused_naming_the_sizes(parallel) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=\d+ with pipeline_parallel_size"):
        executor_class(config(**parallel))
