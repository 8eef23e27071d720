"""Executors run a SchedulerOutput on one worker or on many; `executor_class` picks the one the
engine's `ParallelConfig` needs (the engine core's one place for that choice).

NOTE: torch-free: the executor modules (which import the worker, and torch) load only when
`executor_class` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.config import EngineConfig

if TYPE_CHECKING:
    from pagedllm.engine.core import Executor


def executor_class(config: EngineConfig) -> type[Executor]:
    """The executor for `config.parallel_config`: `UniProcExecutor` (one worker in the engine's
    own process) for a world size of 1; no other exists yet."""
    parallel = config.parallel_config
    if parallel.world_size == 1:
        from pagedllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor
    raise ValueError(
        f"tensor_parallel_size={parallel.tensor_parallel_size} with pipeline_parallel_size="
        f"{parallel.pipeline_parallel_size} (world size {parallel.world_size}) needs a "
        f"multi-process executor, which pagedllm has not yet: only world size 1 runs "
        f"(UniProcExecutor)"
    )
