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
    "parallel",
    [{"tensor_parallel_size": 2}, {"distributed_executor_backend": "mp"}],
    ids=["tp2", "mp-at-one-rank"],
)
def test_several_ranks_or_mp_run_in_worker_processes(parallel) -> None:
    from pagedllm.executor.multiproc import MultiprocExecutor

    assert executor_class(config(**parallel)) is MultiprocExecutor


def test_bad_backends_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of uni, mp"):
        ParallelConfig(distributed_executor_backend="threads")
    with pytest.raises(ValueError, match=r"'uni' runs one rank, but .* is 2"):
        ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="uni")


def test_ray_runs_in_ray_actors() -> None:
    pytest.importorskip("ray")
    from pagedllm.executor.ray import RayExecutor

    assert executor_class(config(distributed_executor_backend="ray")) is RayExecutor
    assert executor_class(config(tensor_parallel_size=2, distributed_executor_backend="ray")) is (
        RayExecutor
    )


def test_ray_without_ray_names_the_field_and_the_extra(monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"distributed_executor_backend='ray' .*pip install 'pagedllm\[ray\]'"
    ):
        ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
